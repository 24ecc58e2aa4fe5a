"""Users' judgements of assistant messages."""

"""Per-user quotas on agent queries and tokens, per UTC day and calendar month."""

"""Documents of the knowledge base."""

"""A person's own data across every feature: the export of everything held about them."""

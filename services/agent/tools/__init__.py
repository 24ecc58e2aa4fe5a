"""Agent tools: the interface (base), the registry and the three tools."""

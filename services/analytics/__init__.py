"""Usage, quotas and the statistics computed from the usage events."""

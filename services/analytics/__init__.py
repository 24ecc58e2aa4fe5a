"""Usage events and the statistics computed from them."""

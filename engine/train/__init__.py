"""Training data for the self-evaluation adapter, and its trainer."""

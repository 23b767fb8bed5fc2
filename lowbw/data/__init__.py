"""lowbw.data."""

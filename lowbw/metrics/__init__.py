"""lowbw.metrics."""

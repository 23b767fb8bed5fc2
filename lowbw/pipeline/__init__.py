"""lowbw.pipeline."""

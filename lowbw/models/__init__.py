"""lowbw.models."""

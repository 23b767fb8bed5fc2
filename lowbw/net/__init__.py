"""lowbw.net."""

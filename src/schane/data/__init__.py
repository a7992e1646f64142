"""schane.data."""

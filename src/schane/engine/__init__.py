"""schane.engine."""

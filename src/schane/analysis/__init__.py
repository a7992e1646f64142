"""schane.analysis."""

"""schane.models."""

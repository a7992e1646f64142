"""schane.fewshot."""

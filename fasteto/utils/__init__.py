"""Small helpers shared across fasteto: atomic file writes."""

"""Small helpers shared across fasteto: atomic file writes, the record of auto choices."""

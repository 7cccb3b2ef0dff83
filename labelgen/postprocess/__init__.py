"""Post-hoc filtering of stored labels, without models."""

"""Labelers: give class names to any generator's instances (CLIP region labeler)."""

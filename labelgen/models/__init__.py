"""Model loading shared by generators and labelers: weights, presets, prompts, feature cache (torch lazily)."""

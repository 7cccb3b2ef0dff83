"""Data types without torch: per-image results (Instances, rows), RLE masks, mask NMS, scoring."""

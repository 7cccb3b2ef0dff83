"""Running a recipe: sources, decoding, the shard pipeline, workers and backends, the runner."""

"""The run directory: a self-describing, resumable, verified store of results, and its status."""

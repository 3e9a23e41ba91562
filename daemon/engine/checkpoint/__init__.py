"""Checkpoints on disk -> a loaded Flux1: layouts, names, checks, quantization, the miniature checkpoint."""

"""Adapter math, free of I/O: LoRA deltas, masks for sparse bases."""

"""Streaming loaders: one ``Batch`` contract, a DALI pipeline (GPU) and its torch twin (CPU)."""

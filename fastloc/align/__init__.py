"""Post-training objectives (MaskEmbed first) and the one loop, checkpointer and CLI that run them."""

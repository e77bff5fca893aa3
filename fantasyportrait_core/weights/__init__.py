"""Checkpoints: file readers, key maps, config inference and strict loaders for every published layout,
LoRA files and applying them, tiny checkpoints with the published key names."""

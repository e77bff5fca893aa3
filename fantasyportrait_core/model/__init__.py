"""The networks and their math: Wan geometry, the portrait adapter, the masked portrait branch of the
cross-attention, the denoiser, the PD-FGC expression encoder, text/image encoders, fp8 storage,
model construction."""

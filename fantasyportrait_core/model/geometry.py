"""Wan2.1 video geometry: how pixel frames and pixels map to latent frames and transformer tokens.

The Wan2.1 VAE keeps the first frame and folds every following 4 pixel frames into one latent frame
(``F_lat = (F - 1) / 4 + 1``, so a video has 4k+1 frames) and downsamples 8x in space; the DiT
patchifies latents 1x2x2, so one token covers 16x16 pixels of one latent frame. Source: Wan2.1
(``wan/modules/vae.py``, ``patch_size=(1, 2, 2)``) and the FantasyPortrait reference
(``find_replacement``: frame counts floored to 4k+1). The one module the adapter, masks, memory
model, sampling and hosts take these numbers from.
"""

from __future__ import annotations

VAE_TEMPORAL_STRIDE = 4  # pixel frames per latent frame after the first
VAE_SPATIAL_STRIDE = 8  # pixels per latent pixel side
PATCH_SIZE = 2  # latent pixels per token side (DiT patch 1x2x2)
TOKEN_STRIDE = VAE_SPATIAL_STRIDE * PATCH_SIZE  # 16 pixels per transformer token side
LATENT_CHANNELS = 16


def latent_frames(num_frames: int) -> int:
    """Latent frames for ``num_frames`` pixel frames (``num_frames`` must be 4k+1).

    Raises:
        ValueError: if ``num_frames`` is not of the form 4k+1 (k >= 0).
    """
    if num_frames < 1 or (num_frames - 1) % VAE_TEMPORAL_STRIDE:
        raise ValueError(
            f"num_frames={num_frames} is not 4k+1 (1, 5, 9, ..., 81); the Wan VAE needs that. "
            f"Use {floor_to_4k1(num_frames)} frames."
        )
    return (num_frames - 1) // VAE_TEMPORAL_STRIDE + 1


def pixel_frames(num_latent_frames: int) -> int:
    """Pixel frames a latent of ``num_latent_frames`` frames decodes to (4k+1)."""
    return VAE_TEMPORAL_STRIDE * (num_latent_frames - 1) + 1


def floor_to_4k1(num_frames: int) -> int:
    """Largest 4k+1 frame count not above ``num_frames`` (reference ``find_replacement``); 0 if none."""
    if num_frames < 1:
        return 0
    return (num_frames - 1) // VAE_TEMPORAL_STRIDE * VAE_TEMPORAL_STRIDE + 1


def latent_shape(num_frames: int, width: int, height: int) -> tuple[int, int, int, int, int]:
    """``(1, 16, F_lat, H/8, W/8)``: the latent of a ``num_frames`` (4k+1) x ``width`` x ``height`` video.

    Raises:
        ValueError: ``num_frames`` not 4k+1.
    """
    return (1, LATENT_CHANNELS, latent_frames(num_frames), height // VAE_SPATIAL_STRIDE, width // VAE_SPATIAL_STRIDE)


def tokens_per_latent_frame(width: int, height: int) -> int:
    """Transformer tokens of one latent frame of a ``width`` x ``height`` (px, multiples of 16) video."""
    return (height // TOKEN_STRIDE) * (width // TOKEN_STRIDE)


def video_tokens(num_frames: int, width: int, height: int) -> int:
    """Transformer tokens of a whole video (any ``num_frames``; ``(F - 1) // 4 + 1`` latent frames)."""
    return ((num_frames - 1) // VAE_TEMPORAL_STRIDE + 1) * tokens_per_latent_frame(width, height)


__all__ = ["LATENT_CHANNELS", "PATCH_SIZE", "TOKEN_STRIDE", "VAE_SPATIAL_STRIDE", "VAE_TEMPORAL_STRIDE",
           "floor_to_4k1", "latent_frames", "latent_shape", "pixel_frames", "tokens_per_latent_frame", "video_tokens"]

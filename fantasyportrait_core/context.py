"""Long videos: overlapping context windows over latent frames with blended overlaps.

Wan2.1 is trained on up to 81 frames (21 latent frames). For longer driving clips the sampler runs
the denoiser on overlapping windows of latent frames at every step and blends their x0 predictions
with linear ramps across each overlap, so the whole video is denoised jointly (no seams from
stitching separately generated clips). Window 0 keeps the reference-image condition at latent frame
0; every window sees the same text and CLIP image context and its own slice of expression tokens and
face masks. The idea is the one of ComfyUI's context windows / AnimateDiff "uniform" contexts.
"""

from __future__ import annotations

import torch

from .attention import PortraitCondition
from .denoiser import I2VConditioning, PortraitDenoiser


def context_windows(num_latent: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """Windows ``[start, end)`` covering ``num_latent`` latent frames, each ``window`` long, as few
    as possible with consecutive windows sharing at least ``overlap``, spread evenly.

    Raises:
        ValueError: for ``window < 1`` or ``overlap`` not in ``[0, window)``.
    """
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"context window {window} / overlap {overlap}: need window >= 1 and 0 <= overlap < window")
    if num_latent <= window:
        return [(0, num_latent)]
    stride = window - overlap
    n = -(-(num_latent - window) // stride) + 1
    starts = [round(i * (num_latent - window) / (n - 1)) for i in range(n)]
    return [(s, s + window) for s in starts]


def window_weights(windows: list[tuple[int, int]], num_latent: int) -> torch.Tensor:
    """Blend weights ``[len(windows), num_latent]`` whose columns sum to 1.

    A window's raw weight at frame t is the distance (in frames, + 1) from t to its nearest inner
    edge (the video's own first and last frames are not edges), 0 outside the window; after
    normalisation the weights ramp linearly through every overlap, also where three windows meet.
    """
    w = torch.zeros(len(windows), num_latent)
    t = torch.arange(num_latent, dtype=torch.float32)
    big = float(num_latent + 1)
    for i, (s, e) in enumerate(windows):
        from_start = t - s + 1 if s > 0 else torch.full_like(t, big)
        to_end = e - t if e < num_latent else torch.full_like(t, big)
        inside = (t >= s) & (t < e)
        w[i] = torch.where(inside, torch.minimum(from_start, to_end), torch.zeros_like(t))
    return w / w.sum(0, keepdim=True)


def slice_portrait(portrait: PortraitCondition | None, start: int, end: int) -> PortraitCondition | None:
    """The expression-token windows and latent person map of latent frames ``[start, end)``."""
    if portrait is None:
        return None
    lp = None if portrait.latent_person is None else portrait.latent_person[start:end]
    return PortraitCondition(portrait.windows[:, start:end], portrait.token_person, lp, portrait.scale)


def slice_conditioning(cond: I2VConditioning, start: int, end: int) -> I2VConditioning:
    return I2VConditioning(cond.text_positive, cond.text_negative, cond.image_context, cond.image_latent[:, :, start:end])


class ContextWindowDenoiser:
    """``denoiser(x, sigma) -> x0`` over overlapping latent-frame windows (see module docstring).

    Args:
        window, overlap: in latent frames (21 and 4 ≈ 81 and 16 pixel frames).
        guidance: optional per-step :class:`~fantasyportrait_core.sampling.GuidanceSchedule`, shared by the windows.
        batch_passes: guidance passes per forward (see ``PortraitDenoiser``).
        Other arguments as :class:`~fantasyportrait_core.denoiser.PortraitDenoiser`.
    """

    def __init__(self, transformer, state, cond: I2VConditioning, portrait: PortraitCondition | None, cfg: float,
                 portrait_cfg: float, window: int = 21, overlap: int = 4, guidance=None,
                 batch_passes: int | None = None):
        num_latent = cond.image_latent.shape[2]
        self.windows = context_windows(num_latent, window, overlap)
        self.weights = window_weights(self.windows, num_latent)
        self.parts = [PortraitDenoiser(transformer, state, slice_conditioning(cond, s, e), slice_portrait(portrait, s, e),
                                       cfg=cfg, portrait_cfg=portrait_cfg, guidance=guidance,
                                       batch_passes=batch_passes) for s, e in self.windows]
        self.device = self.parts[0].device

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        out = torch.zeros_like(x, dtype=torch.float32)
        for (s, e), part, w in zip(self.windows, self.parts, self.weights):
            out[:, :, s:e] += part(x[:, :, s:e], sigma) * w[s:e].view(1, 1, -1, 1, 1).to(out.device)
        return out

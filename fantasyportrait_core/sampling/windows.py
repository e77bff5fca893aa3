"""Long videos: one pass when memory allows, else overlapping context windows with an anchor.

The reference generates its long clips (e.g. 201 frames) in one transformer pass, and that is the
default here whenever the pass fits in the free memory (:func:`plan_context`). Otherwise the sampler
runs the denoiser on overlapping windows of latent frames at every step and blends their x0
predictions with linear ramps across each overlap, so the whole video is denoised jointly (no seams
from stitching separately generated clips; the idea of ComfyUI's context windows / AnimateDiff
"uniform" contexts).

Wan2.1 I2V is trained with the reference image as the condition of latent frame 0. A window that
starts later would, sliced naively, see no reference at all (zero first-frame mask, no image
latent): an input the model never saw in training, so identity can drift. With the default anchor
``"reference"`` every later window is run as a fresh I2V clip of ``1 + window`` latent frames whose
first frame is the video's own latent frame 0: its condition is the reference image (mask 1 +
reference latent, exactly the first window's condition), its noisy input the current state of
latent frame 0 (which the first window pins to the reference), its expression tokens those of
frame 0; the prediction for that extra frame is dropped. The idea of keeping the start frame in
every context is FramePack's anti-drifting anchor (Zhang & Agrawala 2025).

What each choice costs (14B, 720×416, 1170 tokens per latent frame; activations from the memory
model of :mod:`fantasyportrait_core.runtime.memory`, ≈ 22 bytes per token and model channel in bf16, fitted
to the H100 peaks of the project's reference notes; attention ≈ 40 × 0.2 s at 75,600 tokens growing
with tokens²):

* one pass, 201 frames = 51 latent frames = 59,670 tokens: ≈ 6.5 GiB of activations on top of the
  weights (15.5 GiB fp8 / 30.5 GiB bf16), ≈ 8.8 s per forward on an H100;
* windows of 81 frames (21 latent), overlap 16 (4): 3 windows, 21 + 22 + 22 latent frames with the
  reference anchor (+1 frame = +4.8 % tokens and about +10 % attention per later window);
  ≈ 2.8 GiB of activations, ≈ 7.5 s per step-forward in total (7.2 s without the anchor): at
  this length windows save memory, hardly time;
* anchoring on the previous window's last generated frames instead (as clip-extension methods
  do) forbids joint denoising: windows run one after the other (same transformer work), each needs
  a VAE decode of the previous window and an encode of its last frame inside the sampler, the
  sampler would need the VAE, and errors compound from window to window (colour/identity drift);
  Wan2.1 I2V's condition holds one frame only. Not implemented, for these reasons.
"""

from __future__ import annotations

import torch

from fantasyportrait_core.model.geometry import floor_to_4k1
from fantasyportrait_core.model.attention import PortraitCondition
from fantasyportrait_core.model.denoiser import I2VConditioning, PortraitDenoiser

ANCHORS = ("reference", "none")
CONTEXT_MODES = ("auto", "one_pass", "windows")


def plan_context(num_frames: int, mode: str = "auto", context_frames: int = 81, fits=None) -> int | None:
    """Window length (pixel frames) to denoise ``num_frames`` with, or ``None`` for one pass.

    ``mode``: ``"one_pass"`` always one pass (as the reference); ``"windows"`` windows of
    ``context_frames`` whenever the video is longer; ``"auto"`` one pass when ``fits(num_frames)``
    says a forward over the whole video fits in memory, else windows. ``fits(frames) -> bool`` is
    the memory plan's verdict (:func:`fantasyportrait_core.runtime.memory.plan_memory` ``.fits`` for
    ``tokens_per_forward(..., frames)``: weights, activations per token and attention workspace,
    one model for every decision); ``None`` (memory unknown, e.g. no GPU): one pass.

    Raises:
        ValueError: for an unknown mode or a window shorter than 5 frames.
    """
    if mode not in CONTEXT_MODES:
        raise ValueError(f"context mode {mode!r}: choose one of {CONTEXT_MODES}")
    window = floor_to_4k1(int(context_frames))
    if mode != "one_pass" and window < 5:
        raise ValueError(f"context_frames {context_frames}: windows need at least 5 frames")
    if mode == "one_pass" or num_frames <= window:
        return None
    if mode == "windows":
        return window
    return None if fits is None or fits(num_frames) else window


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


def slice_portrait(portrait: PortraitCondition | None, start: int, end: int,
                   anchored: bool = False) -> PortraitCondition | None:
    """The condition of latent frames ``[start, end)``, preceded by frame 0 when ``anchored``
    (:meth:`PortraitCondition.select_frames`)."""
    if portrait is None:
        return None
    return portrait.select_frames(([0] if anchored else []) + list(range(start, end)))


def slice_conditioning(cond: I2VConditioning, start: int, end: int, anchored: bool = False) -> I2VConditioning:
    """The I2V condition of latent frames ``[start, end)``; when ``anchored``, that of a fresh clip
    of ``1 + end - start`` latent frames starting at the reference (the first window's condition:
    first-frame mask + reference latent at frame 0)."""
    y = cond.image_latent[:, :, :1 + end - start] if anchored else cond.image_latent[:, :, start:end]
    return I2VConditioning(cond.text_positive, cond.text_negative, cond.image_context, y)


class ContextWindowDenoiser:
    """``denoiser(x, sigma) -> x0`` over overlapping latent-frame windows (see module docstring).

    Args:
        window, overlap: in latent frames (21 and 4 ≈ 81 and 16 pixel frames).
        guidance: optional per-step :class:`~fantasyportrait_core.sampling.guidance.GuidanceSchedule`, shared by the windows.
        anchor: ``"reference"`` (default): windows after the first also see latent frame 0 with the
            reference condition; ``"none"``: plain slices (later windows get no reference).
        batch_passes: guidance passes per forward (see ``PortraitDenoiser``).
        Other arguments as :class:`~fantasyportrait_core.model.denoiser.PortraitDenoiser`.
    Raises:
        ValueError: for an unknown anchor.
    """

    def __init__(self, transformer, state, cond: I2VConditioning, portrait: PortraitCondition | None, cfg: float,
                 portrait_cfg: float, window: int = 21, overlap: int = 4, anchor: str = "reference", guidance=None,
                 batch_passes: int | None = None):
        if anchor not in ANCHORS:
            raise ValueError(f"window anchor {anchor!r}: choose one of {ANCHORS}")
        num_latent = cond.image_latent.shape[2]
        self.windows = context_windows(num_latent, window, overlap)
        self.weights = window_weights(self.windows, num_latent)
        self.anchored = [anchor == "reference" and s > 0 for s, _ in self.windows]
        self.parts = [PortraitDenoiser(transformer, state, slice_conditioning(cond, s, e, a),
                                       slice_portrait(portrait, s, e, a), cfg=cfg, portrait_cfg=portrait_cfg,
                                       guidance=guidance, batch_passes=batch_passes)
                      for (s, e), a in zip(self.windows, self.anchored)]
        self.device = self.parts[0].device

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        out = torch.zeros_like(x, dtype=torch.float32)
        for (s, e), part, w, anchored in zip(self.windows, self.parts, self.weights, self.anchored):
            if anchored:
                x0 = part(torch.cat([x[:, :, :1], x[:, :, s:e]], dim=2), sigma)[:, :, 1:]
            else:
                x0 = part(x[:, :, s:e], sigma)
            out[:, :, s:e] += x0 * w[s:e].view(1, 1, -1, 1, 1).to(out.device)
        return out

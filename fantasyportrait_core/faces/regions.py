"""Per-person face regions in the reference image and their latent-token person map.

Formulation: FantasyPortrait §3.3 and reference ``infer_multi.py`` (``compute_max_xy``,
``create_mask``, ``resize_mask``): each person's reference face box is widened by that person's
head-motion range in its driving video (at most 0.25 box sizes per side), then pooled to the
transformer's token grid (latent frame 0 from pixel frame 0, latent frame i from pixel frames
4i-3..4i, 16×16 pixels per token = VAE ×8 then patch ×2).

Differences from the reference, on purpose: regions are kept per person (no id-overwrite), a token
covered by several regions goes to the person whose face centre is nearest, and the mask is not
inverted (see :mod:`fantasyportrait_core.model.attention`), so it is right for any number of people.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fantasyportrait_core.model.geometry import TOKEN_STRIDE, VAE_TEMPORAL_STRIDE, latent_frames

MAX_MOTION_EXPAND = 0.25


def motion_range(track_boxes: np.ndarray, cap: float = MAX_MOTION_EXPAND) -> np.ndarray:
    """How far a driving face moves from its first-frame box, per side, in box sizes.

    Reference ``compute_max_xy``. Args: ``track_boxes [F, 4]``. Returns float ``[4]``
    (left, right, up, down), each clipped to ``[0, cap]``.
    """
    boxes = np.asarray(track_boxes, dtype=np.float64)
    x1, y1, x2, y2 = boxes[0]
    w, h = max(x2 - x1, 1e-6), max(y2 - y1, 1e-6)
    lo, hi = boxes.min(0), boxes.max(0)
    ranges = np.array([(x1 - lo[0]) / w, (hi[2] - x2) / w, (y1 - lo[1]) / h, (hi[3] - y2) / h])
    return np.clip(ranges, 0.0, cap)


def expand_box(box: np.ndarray, ranges: np.ndarray, width: int, height: int) -> np.ndarray:
    """Widen ``box`` (x1, y1, x2, y2) by ``ranges`` (left, right, up, down; box sizes), clipped to
    the image; integer pixels as in the reference. Returns int ``[4]``."""
    x1, y1, x2, y2 = np.asarray(box, dtype=np.float64)
    w, h = x2 - x1, y2 - y1
    out = np.array([x1 - w * ranges[0], y1 - h * ranges[2], x2 + w * ranges[1], y2 + h * ranges[3]])
    out = np.array([max(0, int(out[0])), max(0, int(out[1])), min(width, int(out[2])), min(height, int(out[3]))])
    return out


def box_masks(boxes: np.ndarray, height: int, width: int) -> torch.Tensor:
    """Boolean ``[N, H, W]`` masks of integer pixel boxes."""
    masks = torch.zeros(len(boxes), height, width, dtype=torch.bool)
    for i, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, dtype=int)):
        masks[i, y1:y2, x1:x2] = True
    return masks


def pool_to_tokens(masks: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Max-pool per-person pixel masks to the token grid.

    Args:
        masks: ``[N, T, H, W]`` bool/float, ``T`` = 1 (same region every frame) or ``num_frames``;
            H and W multiples of 16.
    Returns:
        bool ``[N, F_lat, H/16, W/16]``.
    Raises:
        ValueError: for a size that is not a multiple of 16 or a frame count mismatch.
    """
    n, t, h, w = masks.shape
    if h % TOKEN_STRIDE or w % TOKEN_STRIDE:
        raise ValueError(f"mask size {w}x{h} must be a multiple of {TOKEN_STRIDE}")
    f_lat = latent_frames(num_frames)
    m = masks.float()
    if t == 1:
        return (F.max_pool2d(m[:, 0], TOKEN_STRIDE) > 0)[:, None].expand(n, f_lat, -1, -1).contiguous()
    if t != num_frames:
        raise ValueError(f"masks have {t} frames, expected 1 or {num_frames}")
    first = F.max_pool2d(m[:, :1], TOKEN_STRIDE)
    rest = F.max_pool3d(m[:, None, 1:], (VAE_TEMPORAL_STRIDE, TOKEN_STRIDE, TOKEN_STRIDE))[:, 0]
    return torch.cat([first, rest], dim=1) > 0


def latent_person_map(token_masks: torch.Tensor, centers: np.ndarray) -> torch.Tensor:
    """Person id per latent token: 0 = background, p+1 = person p.

    A token inside several persons' regions goes to the person whose face centre (in token
    units) is nearest; ties go to the lower index.

    Args:
        token_masks: bool ``[N, F_lat, h, w]`` from :func:`pool_to_tokens`.
        centers: float ``[N, 2]`` face centres (x, y) in pixels.
    Returns:
        long ``[F_lat, h·w]`` (frame-major, row-major: Wan's token order).
    """
    n, f_lat, h, w = token_masks.shape
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    c = torch.as_tensor(np.asarray(centers, dtype=np.float32)) / TOKEN_STRIDE  # [N, 2]
    dist = (xs[None] - c[:, 0, None, None]) ** 2 + (ys[None] - c[:, 1, None, None]) ** 2  # [N, h, w]
    dist = dist[:, None].expand(n, f_lat, h, w).masked_fill(~token_masks, float("inf"))
    best = dist.argmin(0)
    ids = torch.where(token_masks.any(0), best + 1, torch.zeros_like(best))
    return ids.reshape(f_lat, h * w)


def token_person_ids(num_people: int, window_len: int) -> torch.Tensor:
    """Person id (1..N) of each window token when the N persons' windows are concatenated."""
    return torch.arange(1, num_people + 1).repeat_interleave(window_len)

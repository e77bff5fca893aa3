"""The reference image at generation size and the characters' regions in it: output size
(:func:`generation_size`), resizing (:func:`resize_image`), per-character regions, masks and the
latent person map (:func:`reference_layout`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

from fantasyportrait_core.faces.face import Face
from fantasyportrait_core.faces.regions import box_masks, expand_box, latent_person_map, motion_range, pool_to_tokens
from fantasyportrait_core.model.geometry import TOKEN_STRIDE

if TYPE_CHECKING:
    from fantasyportrait_core.drive.encode import DrivingExpression


def generation_size(width: int, height: int, max_size: int = 720, multiple: int = TOKEN_STRIDE) -> tuple[int, int]:
    """Output (width, height): longest side scaled to ``max_size`` then rounded *up* to a multiple
    of 16 (reference ``infer_multi.py`` + ``check_resize_height_width``)."""
    scale = max_size / max(width, height)
    w, h = int(width * scale), int(height * scale)
    return (-(-w // multiple) * multiple, -(-h // multiple) * multiple)


def resize_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize ``[H, W, 3]`` uint8 to ``width × height`` (area when shrinking, cubic when growing)."""
    interp = cv2.INTER_AREA if width * height < image.shape[0] * image.shape[1] else cv2.INTER_CUBIC
    return cv2.resize(image, (width, height), interpolation=interp)


@dataclass
class ReferenceLayout:
    """Characters in the reference image, at generation size.

    Attributes:
        faces: the face of each character, in character order (pixels of the generated size).
        regions: int ``[N, 4]`` per-character face regions (box widened by motion range).
        person_masks: bool ``[N, T, H, W]`` regions as masks (T = 1, or per frame if user-given).
        latent_person: long ``[F_lat, S]`` person id per latent token (0 = background).
    """

    faces: list[Face]
    regions: np.ndarray
    person_masks: torch.Tensor
    latent_person: torch.Tensor


def reference_layout(faces: list[Face], drivers: list[DrivingExpression], width: int, height: int, num_frames: int,
                     user_masks: list[torch.Tensor | None] | None = None) -> ReferenceLayout:
    """Per-character regions and the latent person map.

    Args:
        faces: the face of each character (:func:`assign_faces`), at generation size.
        drivers: one :class:`DrivingExpression` per character, same order.
        user_masks: optional per character ``[T, H, W]`` or ``[H, W]`` masks (any size; resized)
            replacing that character's box region; ``None`` entries keep the box.
    Raises:
        ValueError: if the counts differ.
    """
    if len(faces) != len(drivers):
        raise ValueError(f"{len(faces)} faces for {len(drivers)} characters")
    regions = np.stack([expand_box(f.box, motion_range(d.track.boxes), width, height) for f, d in zip(faces, drivers)])
    masks = box_masks(regions, height, width)[:, None]
    if user_masks is not None and any(m is not None for m in user_masks):
        per_frame = any(m is not None and m.ndim == 3 and m.shape[0] > 1 for m in user_masks)
        masks = masks.repeat(1, num_frames if per_frame else 1, 1, 1)
        for i, m in enumerate(user_masks):
            if m is not None:
                masks[i] = _fit_mask(torch.as_tensor(m), masks.shape[1], height, width)
    centers = np.stack([f.center for f in faces])
    latent_person = latent_person_map(pool_to_tokens(masks, num_frames), centers)
    return ReferenceLayout(list(faces), regions, masks, latent_person)


def _fit_mask(mask: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    """A user mask (``[H, W]`` or ``[T, H, W]``, any size, > 0.5 = inside) as bool ``[frames, height, width]``."""
    m = mask.float()
    m = m[None] if m.ndim == 2 else m
    if m.shape[-2:] != (height, width):
        m = torch.nn.functional.interpolate(m[:, None], size=(height, width), mode="nearest")[:, 0]
    if m.shape[0] != frames:
        if m.shape[0] < frames and frames > 1 and m.shape[0] > 1:
            raise ValueError(f"a character mask has {m.shape[0]} frames; give 1 or {frames}")
        m = m[:1].expand(frames, -1, -1)
    return m > 0.5

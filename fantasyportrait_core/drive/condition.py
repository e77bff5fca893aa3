"""The portrait condition: every character's expression tokens in per-latent-frame windows, with
the masks that keep each character's tokens to its region (:func:`portrait_condition`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fantasyportrait_core.faces.regions import token_person_ids
from fantasyportrait_core.model.adapter import window_length, window_tokens
from fantasyportrait_core.model.attention import PortraitCondition
from fantasyportrait_core.model.geometry import latent_frames

if TYPE_CHECKING:
    from fantasyportrait_core.drive.encode import DrivingExpression
    from fantasyportrait_core.faces.layout import ReferenceLayout


def portrait_condition(adapter, drivers: list[DrivingExpression], num_frames: int,
                       layout: ReferenceLayout | None, scale: float = 1.0) -> PortraitCondition:
    """Expression tokens of every character in per-latent-frame windows, plus their masks.

    One character: no mask (reference single-person behaviour). Several: windows concatenated
    along the token axis in character order, ``token_person`` / ``latent_person`` from ``layout``.

    Args:
        num_frames: pixel frames to generate (4k+1, at most every driver's length).
    Returns:
        :class:`~fantasyportrait_core.model.attention.PortraitCondition` with windows on the adapter's device.
    """
    latent_frames(num_frames)  # validates 4k+1
    short = [d.num_frames for d in drivers if d.num_frames < num_frames]
    if short:
        raise ValueError(f"a driving sequence has {min(short)} frames, fewer than the {num_frames} requested")
    p = next(adapter.parameters())
    feats = torch.stack([d.features[:num_frames] for d in drivers]).to(p.device)  # [N, F, 554]
    with torch.no_grad():
        tokens = adapter.expression_tokens(feats)  # [N, F*24, C]
        windows = window_tokens(tokens, num_frames)  # [N, F_lat, 97, C]
    windows = windows.permute(1, 0, 2, 3).flatten(1, 2)[None]  # [1, F_lat, N*97, C]
    if len(drivers) == 1:
        return PortraitCondition(windows, scale=scale)
    return PortraitCondition(windows, token_person_ids(len(drivers), window_length()),
                             layout.latent_person, scale=scale)

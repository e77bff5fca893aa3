"""Dual classifier-free guidance (text cfg and portrait cfg) and its per-step schedule.

Guidance: FantasyPortrait §3.4 and ``WanVideoPipeline.__call__`` in
``diffsynth/pipelines/wan_video.py``: which DiT passes one step needs and how they combine. The
schedule (guidance interval, portrait scale per step range) maps each step's sigma to the scales
that step uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def combine_guidance(
    v_portrait: torch.Tensor,
    v_positive: torch.Tensor | None,
    v_negative: torch.Tensor | None,
    cfg: float,
    portrait_cfg: float,
) -> torch.Tensor:
    """Dual classifier-free guidance.

    ``pred = neg + cfg·(pos − neg) + portrait_cfg·(pos_portrait − pos)`` where ``pos``/``neg`` are
    the positive/negative prompt without the portrait branch and ``pos_portrait`` the positive
    prompt with it. With ``cfg == 1`` the ``neg`` pass is not needed:
    ``pos + portrait_cfg·(pos_portrait − pos)``. With ``portrait_cfg <= 1`` portrait guidance is off,
    as in the reference (``if portrait_cfg > 1.0`` in ``WanVideoPipeline.__call__``): plain text cfg
    with the portrait branch in both passes, ``neg_portrait + cfg·(pos_portrait − neg_portrait)``
    (then ``v_negative`` is that pass and ``v_positive`` is unused).

    Raises:
        ValueError: if a pass the scales require is missing.
    """
    if portrait_guided(portrait_cfg):
        if v_positive is None:
            raise ValueError("portrait_cfg > 1 needs the positive pass without portrait")
        if cfg == 1.0:
            return v_positive + portrait_cfg * (v_portrait - v_positive)
        if v_negative is None:
            raise ValueError("cfg != 1 needs the negative pass")
        return v_negative + cfg * (v_positive - v_negative) + portrait_cfg * (v_portrait - v_positive)
    if cfg == 1.0:
        return v_portrait
    if v_negative is None:
        raise ValueError("cfg != 1 needs the negative pass")
    return v_negative + cfg * (v_portrait - v_negative)


def portrait_guided(portrait_cfg: float) -> bool:
    """Whether portrait guidance runs: only above 1 (reference ``portrait_cfg > 1.0``); values at or
    below 1 switch it off rather than extrapolating away from the portrait."""
    return portrait_cfg > 1.0


def guidance_passes(cfg: float, portrait_cfg: float) -> list[tuple[str, bool]]:
    """The DiT passes one step needs as ``(prompt, with_portrait)``, in the order used by
    :func:`combine_guidance` (portrait first). 1 to 3 passes."""
    passes = [("positive", True)]
    if portrait_guided(portrait_cfg):
        passes.append(("positive", False))
        if cfg != 1.0:
            passes.append(("negative", False))
    elif cfg != 1.0:
        passes.append(("negative", True))
    return passes


def parse_step_ranges(text: str | None, name: str = "portrait_scale_steps") -> tuple[tuple[float, float, float], ...]:
    """``"0-0.5:1.2, 0.5-1:0.8"`` -> ``((0, 0.5, 1.2), (0.5, 1, 0.8))``: a value per range of sampling
    progress (fractions of the steps, start inclusive, end exclusive; an end of 1 includes the last step).

    Raises:
        ValueError: naming ``name``, for anything but ``start-end:value`` items with
            ``0 <= start < end <= 1``.
    """
    out = []
    for item in (text or "").replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            span, value = item.split(":")
            start, end = (float(v) for v in span.split("-"))
            value = float(value)
        except ValueError:
            raise ValueError(f"{name}: '{item}' must look like 'start-end:value', e.g. '0-0.5:1.2, 0.5-1:0.8' "
                             f"(start/end are fractions of the steps)") from None
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"{name}: range {start}-{end} must satisfy 0 <= start < end <= 1")
        out.append((start, end, value))
    return tuple(out)


def _check_range(rng, name: str) -> tuple[float, float]:
    start, end = (float(v) for v in rng)
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"{name} start/end {start}/{end} must satisfy 0 <= start < end <= 1 (fractions of the steps)")
    return start, end


@dataclass(frozen=True)
class StepGuidance:
    """Guidance of one step: scales and the DiT passes they need (:func:`guidance_passes`)."""

    cfg: float
    portrait_cfg: float
    portrait_scale: float | None  # None: the condition's own scale
    passes: tuple[tuple[str, bool], ...]


class GuidanceSchedule:
    """Per-step guidance: text cfg and portrait cfg only on a range of the steps, portrait scale per
    step range (what users tune with few-step LoRAs: guidance on the first steps only).

    Step ``i`` of ``n`` sits at progress ``i / n``; a range ``[start, end)`` holds it when
    ``start <= i/n < end`` (``end == 1`` includes the last step). Outside its range a scale is 1,
    i.e. off (:func:`combine_guidance`), and the pass it needs is skipped.

    Args:
        sigmas: the schedule (``[n + 1]``); the denoiser is called with these sigmas.
        cfg, portrait_cfg: the scales inside their ranges.
        cfg_range, portrait_cfg_range: ``(start, end)`` fractions, default the whole run.
        portrait_scales: ``(start, end, scale)`` ranges (:func:`parse_step_ranges`); steps in none
            keep the portrait condition's scale.
    Raises:
        ValueError: a range outside ``0 <= start < end <= 1``.
    """

    def __init__(self, sigmas: torch.Tensor, cfg: float = 1.0, portrait_cfg: float = 1.0, cfg_range=(0.0, 1.0),
                 portrait_cfg_range=(0.0, 1.0), portrait_scales=()):
        self.sigmas = [float(s) for s in torch.as_tensor(sigmas).flatten()]
        self.cfg, self.portrait_cfg = float(cfg), float(portrait_cfg)
        self.cfg_range = _check_range(cfg_range, "cfg range")
        self.portrait_cfg_range = _check_range(portrait_cfg_range, "portrait cfg range")
        self.portrait_scales = tuple((*_check_range(r[:2], "portrait scale range"), float(r[2])) for r in portrait_scales)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def step_index(self, sigma: float) -> int:
        """Index of the schedule sigma nearest ``sigma`` (the sampler passes the schedule's values)."""
        return min(range(self.steps), key=lambda i: abs(self.sigmas[i] - sigma))

    def _inside(self, i: int, rng) -> bool:
        return rng[0] <= i / self.steps < rng[1]  # i / n < 1, so an end of 1 includes the last step

    def at_step(self, i: int) -> StepGuidance:
        cfg = self.cfg if self._inside(i, self.cfg_range) else 1.0
        pcfg = self.portrait_cfg if self._inside(i, self.portrait_cfg_range) else 1.0
        scale = next((s for a, b, s in self.portrait_scales if self._inside(i, (a, b))), None)
        return StepGuidance(cfg, pcfg, scale, tuple(guidance_passes(cfg, pcfg)))

    def at(self, sigma: float) -> StepGuidance:
        return self.at_step(self.step_index(sigma))

    def uses_negative(self) -> bool:
        """Whether any step runs a negative-prompt pass."""
        return any(p == "negative" for i in range(self.steps) for p, _ in self.at_step(i).passes)


def step_guidance(schedule: GuidanceSchedule | None, sigma: float, cfg: float, portrait_cfg: float) -> StepGuidance:
    """The guidance of the step at ``sigma``: from ``schedule`` when given, else the fixed scales."""
    if schedule is None:
        return StepGuidance(cfg, portrait_cfg, None, tuple(guidance_passes(cfg, portrait_cfg)))
    return schedule.at(sigma)

"""Wan2.2-I2V-A14B's two experts on our sampler (experimental with FantasyPortrait).

Wan2.2-I2V-A14B (Wan-Video/Wan2.2 ``wan/configs/wan_i2v_A14B.py``, ``wan/image2video.py``; diffusers
``WanImageToVideoPipeline(transformer, transformer_2, boundary_ratio)``) denoises with a high-noise
expert while the timestep ``t = 1000·σ`` is at or above ``boundary·1000`` (I2V 0.900, T2V 0.875) and
with a low-noise expert below. Both are Wan2.1-14B-shaped transformers without the CLIP image
branch; each gets the same portrait processors (:func:`~fantasyportrait_core.model.attention.
attach_portrait_processors`) and the same denoiser (:class:`~fantasyportrait_core.model.denoiser.
PortraitDenoiser` or the context-window one), so the portrait branch, masks and guidance are the
Wan2.1 code. ``adapter_on`` picks the experts that get the portrait branch (the other runs plain
Wan with text guidance only).

The FantasyPortrait adapter was trained on Wan2.1: on Wan2.2 nobody has measured the quality.

Only one expert is on the compute device at a time: at the switch the outgoing expert goes back to
its offload device before the incoming one moves in (:class:`ExpertSwitch`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from fantasyportrait_core.sampling.flow import NUM_TRAIN_TIMESTEPS

log = logging.getLogger("FantasyPortrait")

WAN22_I2V_BOUNDARY = 0.900  # wan_i2v_A14B.py ``boundary``
WAN22_T2V_BOUNDARY = 0.875  # wan_t2v_A14B.py, for reference
ADAPTER_ON = ("both", "high", "low")
EXPERIMENTAL = ("experimental: the FantasyPortrait adapter was trained on Wan2.1; its quality on Wan2.2 has not "
                "been measured")


def expert_at(sigma: float, boundary: float = WAN22_I2V_BOUNDARY) -> str:
    """``"high"`` when the timestep ``1000·sigma`` is at or above ``1000·boundary`` (reference
    ``_prepare_model_for_timestep``: ``t >= boundary``), else ``"low"``."""
    return "high" if float(sigma) * NUM_TRAIN_TIMESTEPS >= boundary * NUM_TRAIN_TIMESTEPS else "low"


def check_expert_options(boundary: float, adapter_on: str) -> None:
    """Raise ``ValueError`` (one line, naming the input) for a boundary outside (0, 1) or an unknown
    ``adapter_on``."""
    if not 0.0 < float(boundary) < 1.0:
        raise ValueError(f"boundary must be between 0 and 1 (Wan2.2 I2V: {WAN22_I2V_BOUNDARY}), got {boundary}")
    if adapter_on not in ADAPTER_ON:
        raise ValueError(f"adapter_on '{adapter_on}' is unknown; choose one of {', '.join(ADAPTER_ON)}")


@dataclass
class Expert:
    """One Wan2.2 expert: its transformer (portrait processors attached) and their shared state."""

    name: str
    transformer: torch.nn.Module
    state: object


@dataclass
class ExpertPair:
    """The two experts of Wan2.2-I2V-A14B and how to use them.

    Attributes:
        high, low: :class:`Expert` s.
        boundary: switch point as a fraction of the 1000 training timesteps (I2V 0.900).
        adapter_on: ``"both"``, ``"high"`` or ``"low"``: which experts run the portrait branch.
        offload_device: where the expert not in use waits (``"cpu"``); ``None`` leaves both where they
            are (e.g. block offload, whose hooks move the weights themselves).
        on_switch: ``on_switch(outgoing name or None, incoming name)`` places the weights instead of
            the plain moves (the nodes: through ComfyUI's model management, which unloads the outgoing
            expert when the incoming one needs the room); ``offload_device`` is then not used.
        trace: ``(sigma, expert name)`` of every denoiser call of the last sampling run, in order
            (what ran where; filled by :class:`ExpertSwitch`).
    """

    high: Expert
    low: Expert
    boundary: float = WAN22_I2V_BOUNDARY
    adapter_on: str = "both"
    offload_device: object = "cpu"
    on_switch: Callable | None = None
    trace: list = field(default_factory=list)

    def __post_init__(self):
        check_expert_options(self.boundary, self.adapter_on)

    def portrait_on(self, name: str) -> bool:
        return self.adapter_on in ("both", name)

    def __getitem__(self, name: str) -> Expert:
        return self.high if name == "high" else self.low


@dataclass
class ExpertSwitch:
    """``denoiser(x, sigma)`` that runs the high- or low-noise expert's own denoiser by ``sigma``.

    Args:
        pair: the :class:`ExpertPair`.
        make: ``make(expert, with_portrait) -> denoiser`` for one expert (the same constructor the
            Wan2.1 path uses; built on the expert's first step, after it moved to the device).
        device: the compute device (where the incoming expert is moved).
    """

    pair: ExpertPair
    make: Callable
    device: object
    _current: str | None = None
    _denoisers: dict = field(default_factory=dict)

    def _switch_to(self, name: str):
        if self.pair.on_switch is not None:
            self.pair.on_switch(self._current, name)
        elif self.pair.offload_device is not None:
            if self._current is not None:  # out first: never both on the device
                self.pair[self._current].transformer.to(self.pair.offload_device)
            self.pair[name].transformer.to(self.device)
        log.info("[FantasyPortrait] Wan2.2 %s-noise expert%s", name,
                 " with the portrait branch" if self.pair.portrait_on(name) else " without the portrait branch")
        self._current = name

    def denoiser(self, name: str):
        if name not in self._denoisers:
            self._denoisers[name] = self.make(self.pair[name], self.pair.portrait_on(name))
        return self._denoisers[name]

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        name = expert_at(sigma, self.pair.boundary)
        if name != self._current:
            self._switch_to(name)
        self.pair.trace.append((float(sigma), name))
        return self.denoiser(name)(x, sigma)

    def release(self):
        """Send the expert in use back to the offload device (end of sampling)."""
        if self._current is not None and self.pair.offload_device is not None and self.pair.on_switch is None:
            self.pair[self._current].transformer.to(self.pair.offload_device)
        self._current = None

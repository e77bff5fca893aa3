"""Flow-matching sampling with dual classifier-free guidance (text cfg and portrait cfg).

Schedule and step: reference ``diffsynth/schedulers/flow_match.py`` (``FlowMatchScheduler(shift=5,
sigma_min=0, extra_one_step=True)``) and Wan2.1. Guidance: FantasyPortrait §3.4 and
``WanVideoPipeline.__call__`` in ``diffsynth/pipelines/wan_video.py``. The sampler is a small
k-diffusion-style function: ``model(x, sigma)`` returns the denoised latent (x0), progress and
interrupts go through ``callback``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

NUM_TRAIN_TIMESTEPS = 1000  # Wan timestep = sigma * 1000
DEFAULT_SHIFT = 5.0
DEFAULT_STEPS = 30


def flow_sigmas(steps: int = DEFAULT_STEPS, shift: float = DEFAULT_SHIFT, denoise: float = 1.0) -> torch.Tensor:
    """Shifted flow-matching sigmas, ``steps + 1`` values from ``sigma_max`` down to 0.

    ``s_i = linspace(denoise, 0, steps + 1)[i]``, ``sigma_i = shift·s / (1 + (shift − 1)·s)``
    (reference ``set_timesteps`` with ``extra_one_step=True``; its last step goes to sigma 0).

    Returns:
        float32 ``[steps + 1]``, strictly decreasing, last value 0.
    Raises:
        ValueError: for ``steps < 1``, ``shift <= 0`` or ``denoise`` outside (0, 1].
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    s = torch.linspace(denoise, 0.0, steps + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).float()


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


@dataclass
class StepInfo:
    """What the sampler reports after each step (k-diffusion's callback dict, as a dataclass)."""

    i: int
    steps: int
    x: torch.Tensor
    sigma: float
    sigma_next: float
    denoised: torch.Tensor


@torch.no_grad()
def sample_euler(
    model: Callable[[torch.Tensor, float], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callable[[StepInfo], None] | None = None,
) -> torch.Tensor:
    """Euler steps of the flow ODE: ``x ← x + v·(σ_next − σ)`` with ``v = (x − x0)/σ``.

    Args:
        model: ``model(x, sigma) -> denoised`` (x0 prediction), same shape as ``x``.
        x: initial latent, ``sigmas[0] · noise`` (flow: at sigma 1 the latent is pure noise).
        sigmas: from :func:`flow_sigmas`.
        callback: called after each step; may raise to interrupt (nothing is left half-updated).
    Returns:
        The final latent, same shape and dtype as ``x``.
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma)
        velocity = (x - denoised) / sigma
        x = x + velocity * (sigma_next - sigma)
        if callback is not None:
            callback(StepInfo(i, len(sigmas) - 1, x, sigma, sigma_next, denoised))
    return x


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Seeded standard-normal latent noise, drawn on the CPU in float32 (reference
    ``generate_noise`` with ``rand_device='cpu'``) so a seed gives the same video on any device."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=generator, dtype=torch.float32)

"""Flow-matching sampling: sigma schedules, presets and samplers (guidance: :mod:`fantasyportrait_core.sampling.guidance`).

Schedule and step: reference ``diffsynth/schedulers/flow_match.py`` (``FlowMatchScheduler(shift=5,
sigma_min=0, extra_one_step=True)``) and Wan2.1. The sampler is a small
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


# --------------------------------------------------------------------------------------------
# More samplers, explicit schedules, presets, denoise, guidance interval

SAMPLERS = ("euler", "unipc", "dpmpp_2m", "dpmpp_2m_sde", "lcm")
SAMPLER_HELP = {
    "euler": "Euler, the reference sampler (first order, deterministic)",
    "unipc": "UniPC bh2 multistep, Wan2.1's default solver (diffusers UniPCMultistepScheduler)",
    "dpmpp_2m": "DPM-Solver++(2M) multistep (diffusers DPMSolverMultistepScheduler)",
    "dpmpp_2m_sde": "DPM-Solver++(2M) SDE, stochastic (diffusers DPMSolverMultistepScheduler)",
    "lcm": "x0 then fresh noise at the next sigma: the sampler of the lightx2v step-distilled models",
}


def check_sigmas(sigmas, name: str = "sigmas") -> torch.Tensor:
    """Validate an explicit flow-matching schedule (a native ComfyUI ``SIGMAS``, a preset, a list).

    Flow-matching sigmas are noise fractions: ``x_σ = (1 − σ)·x0 + σ·noise``, so they lie in
    ``[0, 1]`` (Wan timestep = σ·1000). A schedule that does not end at 0 stops at a partly noisy
    latent (what ``SplitSigmas`` hands to a second sampler).

    Returns:
        float32 ``[steps + 1]``.
    Raises:
        ValueError: naming ``name``, for fewer than 2 values, non-finite values, values outside
            [0, 1], or a schedule that is not strictly decreasing.
    """
    s = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
    if s.numel() < 2:
        raise ValueError(f"{name} needs at least 2 values (start and end sigma), got {s.tolist()}")
    if not torch.isfinite(s).all():
        raise ValueError(f"{name} has non-finite values: {s.tolist()}")
    if s.min() < 0 or s.max() > 1:
        raise ValueError(f"{name} must lie in [0, 1] for a flow-matching model (Wan timestep = sigma·1000), got "
                         f"{[round(v, 4) for v in s.tolist()]}; a schedule made for another model type does not fit")
    if not (s[1:] < s[:-1]).all():
        raise ValueError(f"{name} must be strictly decreasing, got {[round(v, 4) for v in s.tolist()]}")
    return s.float()


def timestep_sigmas(denoising_step_list, shift: float = DEFAULT_SHIFT, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
                    ) -> torch.Tensor:
    """Sigmas of a step-distilled schedule given as training timesteps (lightx2v ``denoising_step_list``).

    lightx2v ``WanStepDistillScheduler.set_denoising_timesteps``
    (``lightx2v/models/schedulers/wan/step_distill/scheduler.py``): the 1000 training sigmas
    ``s_k = 1 − k/1000`` are shifted, ``σ_k = shift·s_k / (1 + (shift − 1)·s_k)``, and timestep ``t`` picks
    index ``k = 1000 − t``; the last step goes to σ = 0. For ``[1000, 750, 500, 250]`` and shift 5:
    ``[1, 0.9375, 0.8333, 0.625, 0]``.

    Returns:
        float32 ``[len(denoising_step_list) + 1]``.
    Raises:
        ValueError: timesteps outside ``1..num_train_timesteps`` or not strictly decreasing; shift <= 0.
    """
    steps = [int(t) for t in denoising_step_list]
    if not steps or any(not 1 <= t <= num_train_timesteps for t in steps) or any(b >= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"denoising steps must be strictly decreasing timesteps in 1..{num_train_timesteps}, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    s = torch.tensor([t / num_train_timesteps for t in steps] + [0.0], dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).float()


@dataclass(frozen=True)
class Preset:
    """A published few-step recipe: sampler, explicit sigmas and the guidance it was distilled for."""

    name: str
    sampler: str
    sigmas: tuple[float, ...]
    cfg: float
    description: str


# lightx2v's own config for its Wan2.1 I2V step-distill LoRA
# (configs/distill/wan21/wan_i2v_distill_lora_4step_cfg.json: infer_steps 4, sample_shift 5,
# enable_cfg false, denoising_step_list [1000, 750, 500, 250]) and its scheduler's step rule (lcm).
PRESETS = {
    "lightx2v": Preset("lightx2v", "lcm", tuple(timestep_sigmas([1000, 750, 500, 250], 5.0).tolist()), 1.0,
                       "lightx2v step distill: 4 steps, timesteps 1000/750/500/250 at shift 5, lcm sampler, cfg 1"),
}


def schedule_sigmas(steps: int = DEFAULT_STEPS, shift: float = DEFAULT_SHIFT, denoise: float = 1.0,
                    sigmas=None, preset: str | None = None) -> torch.Tensor:
    """The sigmas one sampling run uses: explicit ``sigmas`` (e.g. a ComfyUI SIGMAS input) win,
    then a preset's, else :func:`flow_sigmas` from ``steps``/``shift``/``denoise``.

    Raises:
        ValueError: an unknown preset, invalid sigmas (:func:`check_sigmas`), or ``denoise < 1``
            together with explicit or preset sigmas (cut those with SplitSigmas instead).
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} or none")
    explicit = sigmas if sigmas is not None else (PRESETS[preset].sigmas if preset else None)
    if explicit is None:
        return flow_sigmas(steps, shift, denoise)
    if denoise != 1.0:
        raise ValueError(f"denoise {denoise} applies to the steps/shift schedule; with explicit sigmas or a preset "
                         f"set denoise to 1 and start the schedule lower (e.g. SplitSigmas) instead")
    return check_sigmas(explicit, "sigmas" if sigmas is not None else f"preset {preset} sigmas")


def start_latent(noise: torch.Tensor, sigma_start: float, init: torch.Tensor | None = None) -> torch.Tensor:
    """The latent at the first sigma: ``(1 − σ)·init + σ·noise`` (flow matching; reference
    ``FlowMatchScheduler.add_noise``). ``init`` may be omitted only when ``σ == 1``.

    Raises:
        ValueError: ``σ < 1`` (denoise below 1) without a starting latent, or a shape mismatch.
    """
    if init is None:
        if sigma_start < 1.0:
            raise ValueError(f"the schedule starts at sigma {sigma_start:.4f} < 1 (denoise below 1), which needs a "
                             f"starting latent to add noise to (a LATENT with content, or --init-video)")
        return noise * sigma_start
    if tuple(init.shape) != tuple(noise.shape):
        raise ValueError(f"starting latent {tuple(init.shape)} and noise {tuple(noise.shape)} differ in shape")
    return (1.0 - sigma_start) * init.to(noise) + sigma_start * noise


class _NoiseSource:
    """Seeded per-step noise drawn on the CPU (same video on any device), moved to ``like``."""

    def __init__(self, seed: int):
        self.generator = torch.Generator("cpu").manual_seed(int(seed))

    def like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.generator, dtype=torch.float32).to(x.device, x.dtype)


@torch.no_grad()
def sample_lcm(model, x: torch.Tensor, sigmas: torch.Tensor, seed: int = 0,
               callback: Callable[[StepInfo], None] | None = None) -> torch.Tensor:
    """x0 prediction, then fresh noise at the next sigma: ``x ← (1 − σ_next)·x0 + σ_next·ε``.

    The step rule of lightx2v's step-distilled Wan models (``WanStepDistillScheduler.step_post``)
    and of ComfyUI's ``lcm`` sampler; the last step (σ_next = 0) returns x0. Arguments as
    :func:`sample_euler`; ``seed`` seeds the per-step noise (CPU generator).
    """
    noise = _NoiseSource(seed)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma)
        x = denoised.to(x.dtype) if sigma_next == 0 else (1 - sigma_next) * denoised.to(x.dtype) + sigma_next * noise.like(x)
        if callback is not None:
            callback(StepInfo(i, len(sigmas) - 1, x, sigma, sigma_next, denoised))
    return x


def _diffusers_scheduler(sampler: str, sigmas: torch.Tensor):
    """A diffusers flow-matching multistep scheduler set to our exact sigmas.

    ``use_flow_sigmas=True, prediction_type="flow_prediction"`` as in diffusers' Wan pipelines
    (``UniPCMultistepScheduler``, ``DPMSolverMultistepScheduler`` with ``algorithm_type``
    ``"dpmsolver++"`` / ``"sde-dpmsolver++"``, ``solver_order=2``). ``flow_shift`` is irrelevant
    here because the (already shifted) sigmas are set directly; as diffusers does for UniPC, a first
    sigma of exactly 1 is moved to ``1 − 1e-6`` inside the scheduler (log SNR is −∞ there); the model
    is still evaluated at the schedule's own sigma.
    """
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    common = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0, num_train_timesteps=NUM_TRAIN_TIMESTEPS)
    if sampler == "unipc":
        sched = UniPCMultistepScheduler(solver_order=2, **common)
    else:
        sched = DPMSolverMultistepScheduler(solver_order=2, **common, algorithm_type="dpmsolver++" if sampler == "dpmpp_2m"
                                            else "sde-dpmsolver++")
    steps = len(sigmas) - 1
    sched.set_timesteps(steps)
    internal = sigmas.clone().float()
    internal[0] = min(float(internal[0]), 1.0 - 1e-6)
    sched.sigmas = internal
    sched.timesteps = internal[:-1] * NUM_TRAIN_TIMESTEPS
    sched.num_inference_steps = steps
    sched.set_begin_index(0)
    return sched


@torch.no_grad()
def sample_multistep(model, x: torch.Tensor, sigmas: torch.Tensor, sampler: str = "unipc", seed: int = 0,
                     callback: Callable[[StepInfo], None] | None = None) -> torch.Tensor:
    """UniPC / DPM++ 2M / DPM++ 2M SDE steps of diffusers' schedulers on our denoiser.

    ``model(x, σ)`` returns x0; the scheduler takes the flow velocity ``v = (x − x0)/σ`` (computed
    with the scheduler's own σ, so it reconstructs exactly that x0). Runs in float32; the SDE
    variant draws its noise from a seeded CPU generator. Arguments as :func:`sample_euler`.

    Raises:
        ValueError: for a sampler this function does not run.
    """
    if sampler not in ("unipc", "dpmpp_2m", "dpmpp_2m_sde"):
        raise ValueError(f"sample_multistep runs unipc, dpmpp_2m or dpmpp_2m_sde, not {sampler!r}")
    sched = _diffusers_scheduler(sampler, sigmas)
    noise = _NoiseSource(seed) if sampler == "dpmpp_2m_sde" else None
    dtype = x.dtype
    x = x.float()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma).float()
        velocity = (x - denoised) / float(sched.sigmas[i])
        extra = {"variance_noise": noise.like(x)} if noise is not None else {}
        x = sched.step(velocity, sched.timesteps[i], x, **extra).prev_sample
        if callback is not None:
            callback(StepInfo(i, len(sigmas) - 1, x, sigma, sigma_next, denoised))
    return x.to(dtype)


def sample(model, x: torch.Tensor, sigmas: torch.Tensor, sampler: str = "euler", seed: int = 0,
           callback: Callable[[StepInfo], None] | None = None) -> torch.Tensor:
    """Run ``sampler`` (one of :data:`SAMPLERS`) over ``sigmas``; ``seed`` seeds stochastic samplers.

    Raises:
        ValueError: an unknown sampler name (lists the known ones).
    """
    if sampler == "euler":
        return sample_euler(model, x, sigmas, callback=callback)
    if sampler == "lcm":
        return sample_lcm(model, x, sigmas, seed=seed, callback=callback)
    if sampler in SAMPLERS:
        return sample_multistep(model, x, sigmas, sampler=sampler, seed=seed, callback=callback)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")

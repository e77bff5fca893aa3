"""Generation around the sampler: the reference image as the I2V condition (VAE encode,
:func:`encode_reference_latent`), flow sampling with dual guidance (:func:`generate_latent`) and the
VAE decode to frames (:func:`decode_latent`)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from fantasyportrait_core.model.attention import PortraitCondition, PortraitState
from fantasyportrait_core.model.build import denormalize_latent, normalize_latent
from fantasyportrait_core.model.denoiser import I2VConditioning, PortraitDenoiser, first_frame_mask
from fantasyportrait_core.model.geometry import floor_to_4k1, latent_frames, latent_shape
from fantasyportrait_core.sampling.flow import initial_noise, sample, start_latent
from fantasyportrait_core.sampling.windows import ContextWindowDenoiser

log = logging.getLogger("FantasyPortrait")


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> float ``[1, 3, 1, H, W]`` in ``[-1, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1.0


@torch.no_grad()
def encode_reference_latent(vae, image: np.ndarray, num_frames: int) -> torch.Tensor:
    """The 20-channel I2V condition ``[1, 20, F_lat, H/8, W/8]``: first-frame mask + normalised VAE
    latent of ``[reference, zeros × (F−1)]`` (reference ``encode_image``)."""
    p = next(vae.parameters())
    x = image_to_tensor(image)
    video = torch.cat([x, torch.zeros(1, 3, num_frames - 1, *x.shape[-2:])], dim=2).to(p.device, p.dtype)
    latent = normalize_latent(vae.encode(video).latent_dist.mode().float())
    mask = first_frame_mask(latent.shape[2], latent.shape[3], latent.shape[4]).to(latent)
    return torch.cat([mask, latent], dim=1).cpu()


@torch.no_grad()
def decode_latent(vae, latent: torch.Tensor) -> np.ndarray:
    """Normalised latent ``[1, 16, F_lat, h, w]`` -> uint8 frames ``[F, 8h, 8w, 3]``."""
    p = next(vae.parameters())
    video = vae.decode(denormalize_latent(latent.float()).to(p.device, p.dtype)).sample
    video = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return video.permute(1, 2, 3, 0).cpu().numpy()


def generate_latent(transformer, state: PortraitState, cond: I2VConditioning, portrait: PortraitCondition | None,
                    num_frames: int, width: int, height: int, steps: int = 30, seed: int = 42, cfg: float = 1.0,
                    portrait_cfg: float = 4.0, shift: float = 5.0, callback=None, context_frames: int | None = None,
                    context_overlap: int = 16, window_anchor: str = "reference", sampler: str = "euler", sigmas=None,
                    preset: str | None = None, denoise: float = 1.0, init_latent: torch.Tensor | None = None,
                    cfg_range=(0.0, 1.0), portrait_cfg_range=(0.0, 1.0), portrait_scales=(),
                    batch_passes: int | None = None, device=None, resolved=None, experts=None) -> torch.Tensor:
    """Sample a normalised Wan latent ``[1, 16, F_lat, H/8, W/8]`` (float32, CPU).

    Defaults are the shipped reference settings (30 steps, shift 5, cfg 1, portrait cfg 4, seed 42,
    Euler). ``context_frames=None`` (default) denoises the whole video in one pass, as the reference
    does; a window length (pixel frames, from :func:`~fantasyportrait_core.sampling.windows.plan_context`)
    denoises longer videos in overlapping context windows (:mod:`fantasyportrait_core.sampling.windows`;
    overlap ``context_overlap`` pixel frames; later windows anchored on the reference image unless
    ``window_anchor="none"``). ``callback(StepInfo)`` runs after each step and may raise to interrupt.

    Sampling options (:mod:`fantasyportrait_core.sampling.flow`): ``sampler`` (:data:`~.sampling.SAMPLERS`);
    the schedule from ``sigmas`` (explicit), else ``preset`` (e.g. ``"lightx2v"``, which also sets
    its sampler and cfg 1), else ``steps``/``shift``/``denoise``; ``init_latent`` (normalised, same
    shape) is what a schedule starting below sigma 1 adds noise to; ``cfg_range`` /
    ``portrait_cfg_range`` are the guidance intervals and ``portrait_scales`` the per-range portrait
    scales of :class:`~.sampling.GuidanceSchedule`. ``batch_passes``: guidance passes per transformer
    forward (``None`` = all; see :class:`~fantasyportrait_core.model.denoiser.PortraitDenoiser`). ``device``:
    where the transformer computes (where the sampler runs; ``None``:
    :func:`~fantasyportrait_core.runtime.residency.compute_device`, which under block offload is the offload
    hook's onload device, never a weight's current device). ``resolved``: a
    :class:`~fantasyportrait_core.runtime.job.ResolvedSampling` (preset applied, schedules built once by the
    caller); when given, the loose sampling keywords above are not used. ``experts``: a
    :class:`~fantasyportrait_core.sampling.experts.ExpertPair` (Wan2.2-I2V-A14B, experimental):
    ``transformer``/``state`` are then ignored and each step runs the expert its sigma belongs to,
    with the same denoiser (portrait branch, masks, guidance, windows) as Wan2.1; one expert on the
    device at a time; which expert ran at which sigma is in ``experts.trace``.

    Raises:
        FloatingPointError: if the result holds NaN/Inf (never returned silently).
    """
    if resolved is None:
        from fantasyportrait_core.runtime.job import SamplingOptions

        resolved = SamplingOptions(steps, cfg, portrait_cfg, 1.0, shift, seed, sampler, preset, sigmas, denoise,
                                   cfg_range, portrait_cfg_range, portrait_scales).resolve()
    sampler, cfg, portrait_cfg = resolved.sampler, resolved.cfg, resolved.portrait_cfg
    schedule, guidance = resolved.schedule, resolved.guidance
    f_lat = latent_frames(num_frames)
    window = latent_frames(floor_to_4k1(context_frames)) if context_frames else f_lat

    def make(transformer, state, portrait):
        if f_lat > window:
            overlap = min(max(1, context_overlap // 4), window - 1)
            d = ContextWindowDenoiser(transformer, state, cond, portrait, cfg, portrait_cfg, window, overlap,
                                      anchor=window_anchor, guidance=guidance, batch_passes=batch_passes)
            log.info("[FantasyPortrait] %d frames: %d context windows of %d latent frames (anchor: %s)", num_frames,
                     len(d.windows), window, window_anchor)
            return d
        return PortraitDenoiser(transformer, state, cond, portrait, cfg=cfg, portrait_cfg=portrait_cfg,
                                guidance=guidance, batch_passes=batch_passes, device=device)

    if experts is not None:
        from fantasyportrait_core.runtime.residency import compute_device
        from fantasyportrait_core.sampling.experts import ExpertSwitch

        experts.trace.clear()
        denoiser = ExpertSwitch(experts, lambda e, on: make(e.transformer, e.state, portrait if on else None),
                                compute_device(experts.high.transformer, device))
    else:
        denoiser = make(transformer, state, portrait)
    noise = initial_noise(latent_shape(num_frames, width, height), seed)
    x = start_latent(noise, float(schedule[0]), init_latent).to(denoiser.device)
    try:
        out = sample(denoiser, x, schedule, sampler, seed=seed + 1, callback=callback).float().cpu()
    finally:
        if experts is not None:
            denoiser.release()
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        raise FloatingPointError(f"sampling produced {bad} NaN/infinite latent value(s) of {out.numel()}: the weights or "
                                 f"conditions hold NaN, or fp16 overflowed (use bf16 weights)")
    return out

"""Wan2.1 I2V denoiser with the portrait branch: latent + conditions -> denoised latent.

Assembles the transformer inputs the way the reference ``WanModel.forward`` and diffusers'
``WanImageToVideoPipeline`` do (36 input channels = 16 noisy latent + 4 first-frame mask + 16
reference-image latent; text context zero-padded to 512 tokens; CLIP image tokens in front) and
runs the 1–3 passes that dual guidance needs (:mod:`fantasyportrait_core.sampling`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import TEXT_CONTEXT_TOKENS, PortraitCondition, PortraitState
from .sampling import NUM_TRAIN_TIMESTEPS, GuidanceSchedule, combine_guidance, guidance_passes, step_guidance


@dataclass
class I2VConditioning:
    """Conditions of one Wan2.1 image-to-video generation.

    Attributes:
        text_positive: ``[1, L, text_dim]`` umT5 embeddings, ``L <= 512`` (padded here).
        text_negative: same for the negative prompt; ``None`` when cfg is 1.
        image_context: ``[1, 257, image_dim]`` CLIP-ViT-H penultimate hidden states of the reference.
        image_latent: ``[1, 20, F_lat, H/8, W/8]``: 4 first-frame mask channels then the 16
            normalised VAE latent channels of ``[reference, zeros…]`` (reference ``encode_image``).
    """

    text_positive: torch.Tensor
    text_negative: torch.Tensor | None
    image_context: torch.Tensor | None
    image_latent: torch.Tensor


def pad_text(text: torch.Tensor, length: int = TEXT_CONTEXT_TOKENS) -> torch.Tensor:
    """Zero-pad ``[B, L, C]`` text embeddings to ``length`` tokens (Wan ``text_len``).

    Raises:
        ValueError: if there are more than ``length`` tokens.
    """
    if text.ndim == 2:
        text = text[None]
    if text.shape[1] > length:
        raise ValueError(f"text embeddings have {text.shape[1]} tokens; Wan takes at most {length}")
    return F.pad(text, (0, 0, 0, length - text.shape[1]))


def first_frame_mask(num_latent_frames: int, height: int, width: int) -> torch.Tensor:
    """The 4 mask channels of Wan I2V: ``[1, 4, F_lat, h, w]``, ones at latent frame 0, zeros after.

    Reference ``encode_image``: a per-pixel-frame mask (1 for frame 0) with frame 0 repeated 4
    times, folded 4 pixel frames per latent frame into channels.
    """
    mask = torch.zeros(1, 4, num_latent_frames, height, width)
    mask[:, :, 0] = 1.0
    return mask


class PortraitDenoiser:
    """``denoiser(x, sigma) -> x0`` for :func:`~fantasyportrait_core.sampling.sample_euler`.

    Args:
        transformer: diffusers ``WanTransformer3DModel`` with portrait processors attached.
        state: the :class:`PortraitState` those processors read.
        cond: :class:`I2VConditioning`.
        portrait: expression windows (+ masks); ``None`` runs plain Wan I2V.
        cfg: text guidance scale; portrait_cfg: portrait guidance scale.
        portrait_scale: strength of the portrait branch inside the DiT (reference ``ip_scale``).
        guidance: optional :class:`~fantasyportrait_core.sampling.GuidanceSchedule` (guidance
            interval, portrait scale per step range); its scales replace ``cfg``/``portrait_cfg``.
    """

    def __init__(self, transformer, state: PortraitState, cond: I2VConditioning,
                 portrait: PortraitCondition | None, cfg: float = 1.0, portrait_cfg: float = 4.0,
                 guidance: GuidanceSchedule | None = None):
        self.transformer, self.state, self.cond, self.portrait = transformer, state, cond, portrait
        self.cfg, self.portrait_cfg = float(cfg), float(portrait_cfg)
        if portrait is None:
            self.portrait_cfg = 1.0
            if guidance is not None:
                guidance = GuidanceSchedule(guidance.sigmas, guidance.cfg, 1.0, guidance.cfg_range)
        self.guidance = guidance
        self._base_scale = None if portrait is None else portrait.scale
        self.passes = guidance_passes(self.cfg, self.portrait_cfg)
        negative = guidance.uses_negative() if guidance is not None else any(p == "negative" for p, _ in self.passes)
        if negative and cond.text_negative is None:
            raise ValueError("cfg != 1 needs a negative prompt embedding (text_negative)")
        # The input projection's weight gives the compute dtype (the first parameter, a modulation
        # table, is kept in fp32 by diffusers and would mislead).
        p = transformer.patch_embedding.weight
        self.device, self.dtype = p.device, p.dtype
        self._context = {name: self._context_for(t) for name, t in
                         (("positive", cond.text_positive), ("negative", cond.text_negative)) if t is not None}
        self._image_context = None if cond.image_context is None else cond.image_context.to(self.device, self.dtype)
        self._y = cond.image_latent.to(self.device, self.dtype)

    def _context_for(self, text: torch.Tensor) -> torch.Tensor:
        return pad_text(text).to(self.device, self.dtype)

    def velocity(self, x: torch.Tensor, sigma: float, prompt: str, with_portrait: bool) -> torch.Tensor:
        """One DiT pass: ``x [1, 16, F_lat, h, w]`` -> flow velocity (float32, same shape)."""
        hidden = torch.cat([x.to(self.device, self.dtype), self._y], dim=1)
        timestep = torch.full((x.shape[0],), sigma * NUM_TRAIN_TIMESTEPS, device=self.device, dtype=torch.float32)
        self.state.condition = self.portrait if with_portrait else None
        try:
            out = self.transformer(hidden, timestep, self._context[prompt],
                                   encoder_hidden_states_image=self._image_context, return_dict=False)[0]
        finally:
            self.state.condition = None
        return out.float()

    def step_guidance(self, sigma: float):
        """Scales and passes of the step at ``sigma`` (sets the portrait scale of that step)."""
        g = step_guidance(self.guidance, sigma, self.cfg, self.portrait_cfg)
        if self.portrait is not None:
            self.portrait.scale = self._base_scale if g.portrait_scale is None else g.portrait_scale
        return g

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        g = self.step_guidance(sigma)
        preds = {key: self.velocity(x, sigma, *key) for key in g.passes}
        v = combine_guidance(
            preds[("positive", True)],
            preds.get(("positive", False)),
            preds.get(("negative", False), preds.get(("negative", True))),
            g.cfg, g.portrait_cfg,
        )
        return x.float() - sigma * v.to(x.device)

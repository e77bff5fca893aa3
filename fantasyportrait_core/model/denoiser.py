"""Wan2.1 I2V denoiser with the portrait branch: latent + conditions -> denoised latent.

Assembles the transformer inputs the way the reference ``WanModel.forward`` and diffusers'
``WanImageToVideoPipeline`` do (36 input channels = 16 noisy latent + 4 first-frame mask + 16
reference-image latent; text context zero-padded to 512 tokens; CLIP image tokens in front) and
runs the 1–3 passes that dual guidance needs (:mod:`fantasyportrait_core.sampling.flow`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fantasyportrait_core.model.attention import TEXT_CONTEXT_TOKENS, PortraitCondition, PortraitState, projection_dtype
from fantasyportrait_core.runtime.residency import compute_device
from fantasyportrait_core.sampling.flow import NUM_TRAIN_TIMESTEPS
from fantasyportrait_core.sampling.guidance import GuidanceSchedule, combine_guidance, guidance_passes, step_guidance


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


def is_compiled(transformer) -> bool:
    """Whether the transformer's blocks were compiled (``torch.compile`` / diffusers
    ``compile_repeated_blocks``): then every pass keeps the same graph inputs (see
    :meth:`PortraitDenoiser.run_passes`)."""
    blocks = getattr(transformer, "blocks", None)
    return bool(blocks) and getattr(blocks[0], "_compiled_call_impl", None) is not None


class PortraitDenoiser:
    """``denoiser(x, sigma) -> x0`` for :func:`~fantasyportrait_core.sampling.flow.sample_euler`.

    Args:
        transformer: diffusers ``WanTransformer3DModel`` with portrait processors attached.
        state: the :class:`PortraitState` those processors read.
        cond: :class:`I2VConditioning`.
        portrait: expression windows (+ masks); ``None`` runs plain Wan I2V.
        cfg: text guidance scale; portrait_cfg: portrait guidance scale.
        portrait_scale: strength of the portrait branch inside the DiT (reference ``ip_scale``).
        guidance: optional :class:`~fantasyportrait_core.sampling.guidance.GuidanceSchedule` (guidance
            interval, portrait scale per step range); its scales replace ``cfg``/``portrait_cfg``.
        batch_passes: most guidance passes run as one forward (rows of one batch); ``None`` = all
            of a step's 1–3 passes at once. 1 runs them one after another (least memory: the
            activations of one forward scale with its batch; see :mod:`fantasyportrait_core.runtime.memory`).
        device: where the forward computes (the CLI's ``--device``, the node's ComfyUI device);
            ``None``: :func:`~fantasyportrait_core.runtime.residency.compute_device` (the group-offload
            onload device under block offload, else the input projection's device). The latent,
            text/image conditions and the portrait condition (windows, masks, scale) are put there.
    """

    def __init__(self, transformer, state: PortraitState, cond: I2VConditioning,
                 portrait: PortraitCondition | None, cfg: float = 1.0, portrait_cfg: float = 4.0,
                 guidance: GuidanceSchedule | None = None, batch_passes: int | None = None, device=None):
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
        if batch_passes is not None and batch_passes < 1:
            raise ValueError(f"batch_passes must be >= 1 or None, got {batch_passes}")
        self.batch_passes = batch_passes
        # The input projection's weight gives the compute dtype (the first parameter, a modulation
        # table, is kept in fp32 by diffusers and would mislead), but not the device: block offload
        # moves that weight back to the CPU after every forward (see compute_device).
        self.device = compute_device(transformer, device)
        self.dtype = transformer.patch_embedding.weight.dtype
        self._context = {name: self._context_for(t) for name, t in
                         (("positive", cond.text_positive), ("negative", cond.text_negative)) if t is not None}
        self._image_context = None if cond.image_context is None else cond.image_context.to(self.device, self.dtype)
        self._y = cond.image_latent.to(self.device, self.dtype)
        processor = getattr(transformer.blocks[0].attn2, "processor", None) if len(transformer.blocks) else None
        k_proj = getattr(processor, "k_proj", None)
        self._proj_dtype = self.dtype if k_proj is None else projection_dtype(k_proj, self.dtype)

    def _context_for(self, text: torch.Tensor) -> torch.Tensor:
        return pad_text(text).to(self.device, self.dtype)

    def _condition_for(self, rows: int):
        """What the processors read for a forward whose leading ``rows`` rows take the portrait
        branch: the prepared condition (built once, cached on the condition), or ``None``. A compiled
        model gets a scale-0 condition instead of ``None`` so that it keeps one graph."""
        if self.portrait is None:
            return None
        proj_dtype = self._proj_dtype
        if rows:
            return self.portrait.prepared(self.device, self.dtype, proj_dtype, rows=rows)
        if is_compiled(self.transformer):
            return self.portrait.prepared(self.device, self.dtype, proj_dtype, rows=1, scale=0.0)
        return None

    def run_passes(self, x: torch.Tensor, sigma: float, passes) -> dict:
        """DiT velocities for ``passes`` (``(prompt, with_portrait)`` pairs), at most
        ``batch_passes`` of them per forward, stacked on the batch axis with the portrait rows first.

        Returns:
            ``{pass: float32 [1, 16, F_lat, h, w]}``.
        """
        passes = sorted(passes, key=lambda p: not p[1])  # portrait rows lead (stable)
        size = len(passes) if self.batch_passes is None else self.batch_passes
        preds = {}
        for start in range(0, len(passes), size):
            group = passes[start:start + size]
            out = self._forward(x, sigma, [p for p, _ in group], sum(w for _, w in group))
            preds.update(zip(group, out.float().split(1)))
        return preds

    def _forward(self, x: torch.Tensor, sigma: float, prompts: list[str], rows: int) -> torch.Tensor:
        """One transformer forward of ``len(prompts)`` rows (same latent, one prompt per row; the
        first ``rows`` rows with the portrait branch) -> velocity ``[rows_total, 16, F_lat, h, w]``."""
        b = len(prompts)
        latent = x.to(self.device, self.dtype)
        hidden = torch.cat([latent, self._y], dim=1)
        hidden = hidden.expand(b, -1, -1, -1, -1) if b > 1 else hidden
        timestep = torch.full((b,), sigma * NUM_TRAIN_TIMESTEPS, device=self.device, dtype=torch.float32)
        context = torch.cat([self._context[p] for p in prompts]) if b > 1 else self._context[prompts[0]]
        image = self._image_context
        if image is not None and b > 1:
            image = image.expand(b, -1, -1)
        self.state.condition = self._condition_for(rows)
        try:
            return self.transformer(hidden, timestep, context, encoder_hidden_states_image=image,
                                    return_dict=False)[0]
        finally:
            self.state.condition = None

    def velocity(self, x: torch.Tensor, sigma: float, prompt: str, with_portrait: bool) -> torch.Tensor:
        """One DiT pass on its own: ``x [1, 16, F_lat, h, w]`` -> flow velocity (float32, same shape)."""
        return self._forward(x, sigma, [prompt], int(with_portrait)).float()

    def step_guidance(self, sigma: float):
        """Scales and passes of the step at ``sigma`` (sets the portrait scale of that step)."""
        g = step_guidance(self.guidance, sigma, self.cfg, self.portrait_cfg)
        if self.portrait is not None:
            self.portrait.scale = self._base_scale if g.portrait_scale is None else g.portrait_scale
        return g

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        g = self.step_guidance(sigma)
        preds = self.run_passes(x, sigma, g.passes)
        v = combine_guidance(
            preds[("positive", True)],
            preds.get(("positive", False)),
            preds.get(("negative", False), preds.get(("negative", True))),
            g.cfg, g.portrait_cfg,
        )
        return x.float() - sigma * v.to(x.device)

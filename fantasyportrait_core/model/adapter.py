"""FantasyPortrait portrait adapter: expression features -> expression tokens -> per-latent-frame windows.

Formulation: FantasyPortrait (arXiv 2507.12956) §3.2 and the reference
``diffsynth/pipelines/wan_video.py`` (``MultiProjModel``, ``Resampler``, ``PortraitAdapter``).
Module and parameter names match the published checkpoints exactly
(``proj_model.*``, ``mouth_proj_model.*``, ``emo_proj_model.*``,
``ip_adapter.blocks.N.cross_attn.ip_adapter_single_stream_{k,v}_proj.weight``) so a state dict
loads with ``strict=True``.

Per driving frame the expression encoder gives 554 numbers, in this order:
headpose 6, eye 6, emotion 30, mouth 512. The adapter turns them into 24 tokens of
``proj_dim`` (2048): 4 from ``proj_model`` (headpose, eye, emotion, mouth; one token each),
16 from ``mouth_proj_model`` and 4 from ``emo_proj_model``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fantasyportrait_core.model.geometry import VAE_TEMPORAL_STRIDE, latent_frames

# Split of the 554 per-frame expression features (reference ``get_adapter_proj``).
HEADPOSE_DIM = 6
EYE_DIM = 6
EMOTION_DIM = 30
MOUTH_DIM = 512
FEATURE_SPLIT = (HEADPOSE_DIM, EYE_DIM, EMOTION_DIM, MOUTH_DIM)
EXPRESSION_DIM = sum(FEATURE_SPLIT)  # 554

PROJ_TOKENS = 4
MOUTH_TOKENS = 16
EMOTION_TOKENS = 4
TOKENS_PER_FRAME = PROJ_TOKENS + MOUTH_TOKENS + EMOTION_TOKENS  # 24

# Model families sharing this adapter layout: FantasyPortrait (arXiv 2507.12956) and FlashPortrait
# (arXiv 2512.16900, Francis-Rings/FlashPortrait).
FAMILIES = ("fantasyportrait", "flashportrait")


def window_length(tokens_per_frame: int = TOKENS_PER_FRAME) -> int:
    """Tokens in one latent frame's window: 4 frames of tokens + 1 overlap token (97 for 24)."""
    return VAE_TEMPORAL_STRIDE * tokens_per_frame + 1


class ExpressionProjection(nn.Module):
    """``proj_model``: one bias-free linear per feature group and a shared LayerNorm.

    Reference: ``MultiProjModel`` in ``diffsynth/pipelines/wan_video.py``.

    Args:
        proj_dim: token width (2048 in the released model).
    """

    def __init__(self, proj_dim: int = 2048):
        super().__init__()
        self.proj_dim = proj_dim
        self.headpose_proj = nn.Linear(HEADPOSE_DIM, proj_dim, bias=False)
        self.eye_proj = nn.Linear(EYE_DIM, proj_dim, bias=False)
        self.emo_proj = nn.Linear(EMOTION_DIM, proj_dim, bias=False)
        self.mouth_proj = nn.Linear(MOUTH_DIM, proj_dim, bias=False)
        self.norm = nn.LayerNorm(proj_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: ``[B, F, 554]`` -> tokens ``[B, F, 4, proj_dim]`` (headpose, eye, emotion, mouth)."""
        headpose, eye, emo, mouth = torch.split(features, FEATURE_SPLIT, dim=-1)
        tokens = [self.headpose_proj(headpose), self.eye_proj(eye), self.emo_proj(emo), self.mouth_proj(mouth)]
        return self.norm(torch.stack(tokens, dim=2))


class PerceiverAttention(nn.Module):
    """Latent queries attend to ``[inputs, latents]`` (IP-Adapter-plus perceiver attention).

    Reference: ``PerceiverAttention`` in ``diffsynth/pipelines/wan_video.py``; the reference's
    ``(q·s)(k·s)ᵀ`` with ``s = d^-1/4`` and fp32 softmax equals SDPA's ``d^-1/2`` scaling.
    """

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.heads = heads
        inner_dim = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x: ``[B, N1, dim]`` inputs, latents: ``[B, N2, dim]`` -> ``[B, N2, dim]``."""
        x = self.norm1(x)
        latents = self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        return self.to_out(out.transpose(1, 2).flatten(2))


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    # Indices 0..3 are part of the checkpoint key names (layers.N.1.{0,1,3}).
    inner = dim * mult
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False))


class Resampler(nn.Module):
    """Perceiver resampler: ``num_queries`` learned latents read one feature vector per frame.

    Reference: ``Resampler`` in ``diffsynth/pipelines/wan_video.py`` (``mouth_proj_model``:
    16 queries over 512 mouth features; ``emo_proj_model``: 4 queries over 30 emotion features).
    """

    def __init__(
        self,
        dim: int = 1280,
        depth: int = 4,
        dim_head: int = 64,
        heads: int = 20,
        num_queries: int = 16,
        embedding_dim: int = 512,
        output_dim: int = 2048,
        ff_mult: int = 4,
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), _feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, N, embedding_dim]`` -> ``[B, num_queries, output_dim]``."""
        # .to(x): a no-op here; under ComfyUI's partial loading the learned latents may stay on the
        # offload device while the layers run on the GPU (nodes/native.py).
        latents = self.latents.to(x).expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class _CrossAttnKV(nn.Module):
    """Holder whose parameter names match ``...cross_attn.ip_adapter_single_stream_{k,v}_proj.weight``."""

    def __init__(self, proj_dim: int, dim: int):
        super().__init__()
        self.ip_adapter_single_stream_k_proj = nn.Linear(proj_dim, dim, bias=False)
        self.ip_adapter_single_stream_v_proj = nn.Linear(proj_dim, dim, bias=False)
        # Zero init (reference SingleStreamBlockProcessor): a fresh adapter adds nothing.
        nn.init.zeros_(self.ip_adapter_single_stream_k_proj.weight)
        nn.init.zeros_(self.ip_adapter_single_stream_v_proj.weight)


class _Block(nn.Module):
    def __init__(self, proj_dim: int, dim: int):
        super().__init__()
        self.cross_attn = _CrossAttnKV(proj_dim, dim)


class _BlockList(nn.Module):
    def __init__(self, num_layers: int, proj_dim: int, dim: int):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(proj_dim, dim) for _ in range(num_layers))


class PortraitAdapter(nn.Module):
    """The FantasyPortrait adapter weights and the expression-features -> tokens path.

    Its ``state_dict()`` keys are exactly the repacked safetensors' keys minus ``pd_fpg.*``:
    ``proj_model.*``, ``mouth_proj_model.*``, ``emo_proj_model.*`` and
    ``ip_adapter.blocks.{i}.cross_attn.ip_adapter_single_stream_{k,v}_proj.weight``.

    Args:
        dim: transformer width (5120 for Wan2.1-14B); K/V projections map ``proj_dim -> dim``.
        num_layers: transformer blocks (40 for 14B); one K/V pair per block.
        proj_dim: expression-token width (2048 released).
        resampler_dim, resampler_depth, resampler_heads: resampler sizes (1280, 4, 20 released).
        family: ``"fantasyportrait"`` (default) or ``"flashportrait"``. FlashPortrait
            (Francis-Rings/FlashPortrait) ships a whole fine-tuned DiT whose blocks carry
            ``cross_attn.emo_{k,v}_proj.weight`` ``[dim, proj_dim]`` (no bias) and a
            ``portrait_encoder.pt`` with this token path's key names; its ``emo_{k,v}_proj`` play the
            role of the K/V projections here and are loaded into the same slots
            (``ip_adapter.blocks.N.cross_attn.ip_adapter_single_stream_{k,v}_proj``), so one adapter
            object serves both families; the family switches on the normalised expression block
            (:attr:`normalize_expression`).
    """

    def __init__(
        self,
        dim: int,
        num_layers: int,
        proj_dim: int = 2048,
        resampler_dim: int = 1280,
        resampler_depth: int = 4,
        resampler_heads: int = 20,
        resampler_dim_head: int = 64,
        family: str = "fantasyportrait",
    ):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"adapter family {family!r} is unknown; choose one of {FAMILIES}")
        self.dim, self.num_layers, self.proj_dim, self.family = dim, num_layers, proj_dim, family
        common = dict(dim=resampler_dim, depth=resampler_depth, dim_head=resampler_dim_head, heads=resampler_heads,
                      output_dim=proj_dim, ff_mult=4)
        self.proj_model = ExpressionProjection(proj_dim)
        self.mouth_proj_model = Resampler(num_queries=MOUTH_TOKENS, embedding_dim=MOUTH_DIM, **common)
        self.emo_proj_model = Resampler(num_queries=EMOTION_TOKENS, embedding_dim=EMOTION_DIM, **common)
        self.ip_adapter = _BlockList(num_layers, proj_dim, dim)

    @property
    def normalize_expression(self) -> bool:
        """True for FlashPortrait: the portrait branch is rescaled to the text + image output
        (:func:`fantasyportrait_core.model.attention.normalize_expression`)."""
        return self.family == "flashportrait"

    def kv_projections(self, block: int) -> tuple[nn.Linear, nn.Linear]:
        """The (K, V) projections, ``proj_dim -> dim`` without bias, that block ``block`` adds to its cross-attention."""
        ca = self.ip_adapter.blocks[block].cross_attn
        return ca.ip_adapter_single_stream_k_proj, ca.ip_adapter_single_stream_v_proj

    def expression_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Expression features -> expression tokens.

        Reference: ``PortraitAdapter.get_adapter_proj``.

        Args:
            features: ``[B, F, 554]`` float, per frame headpose 6, eye 6, emotion 30, mouth 512.
        Returns:
            ``[B, F * 24, proj_dim]``: per frame 4 projection tokens, 16 mouth tokens, 4 emotion tokens.
        Raises:
            ValueError: if the last dimension is not 554.
        """
        if features.ndim != 3 or features.shape[-1] != EXPRESSION_DIM:
            raise ValueError(f"expression features must be [B, F, {EXPRESSION_DIM}], got {tuple(features.shape)}")
        b, f, _ = features.shape
        dtype = self.proj_model.norm.weight.dtype
        features = features.to(dtype)
        _, _, emo, mouth = torch.split(features, FEATURE_SPLIT, dim=-1)
        mouth_tokens = self.mouth_proj_model(mouth.reshape(b * f, 1, MOUTH_DIM)).view(b, f, MOUTH_TOKENS, -1)
        emo_tokens = self.emo_proj_model(emo.reshape(b * f, 1, EMOTION_DIM)).view(b, f, EMOTION_TOKENS, -1)
        proj_tokens = self.proj_model(features)
        return torch.cat([proj_tokens, mouth_tokens, emo_tokens], dim=2).flatten(1, 2)


def window_indices(num_frames: int, tokens_per_frame: int = TOKENS_PER_FRAME) -> torch.Tensor:
    """Token indices of each latent frame's window; ``-1`` marks a zero pad.

    Reference: ``split_audio_adapter_sequence`` + ``split_tensor_with_padding`` (expand_length 0).
    Latent frame 0 sees pixel frame 0's tokens followed by ``3·T + 1`` zero tokens (the
    reference pads at the back); latent frame i >= 1 sees the last token of pixel frame
    ``4i-4`` and all tokens of pixel frames ``4i-3 .. 4i``.

    Returns:
        long ``[F_lat, 4·T + 1]``.
    """
    f_lat = latent_frames(num_frames)
    t = tokens_per_frame
    w = window_length(t)
    offsets = torch.arange(w)
    starts = t * (VAE_TEMPORAL_STRIDE * torch.arange(f_lat) - 3) - 1
    idx = starts[:, None] + offsets[None, :]
    idx[0] = torch.where(offsets < t, offsets, torch.full_like(offsets, -1))
    return idx


def window_tokens(tokens: torch.Tensor, num_frames: int, tokens_per_frame: int = TOKENS_PER_FRAME) -> torch.Tensor:
    """Group expression tokens into per-latent-frame windows.

    Args:
        tokens: ``[B, F * T, C]`` from :meth:`PortraitAdapter.expression_tokens`, ``F = num_frames``.
        num_frames: pixel frames F, 4k+1.
    Returns:
        ``[B, F_lat, 4·T + 1, C]`` (97 tokens per window for T = 24), zero where padded.
    Raises:
        ValueError: if the token count does not equal ``num_frames * T``.
    """
    if tokens.shape[1] != num_frames * tokens_per_frame:
        raise ValueError(f"{tokens.shape[1]} expression tokens do not match {num_frames} frames x {tokens_per_frame}")
    idx = window_indices(num_frames, tokens_per_frame).to(tokens.device)
    padded = F.pad(tokens, (0, 0, 0, 1))  # index -1 picks this zero row
    return padded[:, idx]

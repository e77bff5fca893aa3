"""Portrait branch of the Wan cross-attention, masked per character.

Formulation: FantasyPortrait §3.2–3.3 and the reference ``SingleStreamBlockProcessor``
(``diffsynth/pipelines/wan_video.py``): in every block the normalised cross-attention query
attends, one latent frame at a time, to that latent frame's window of expression tokens through
the adapter's K/V projections; the result times the portrait scale is added to the text and image
branches before the output projection. With several characters a boolean mask lets each latent
token see only the tokens of the person whose face region holds it. Unlike the reference (whose
mask lets background tokens see every person's tokens), background tokens get no portrait branch.

The processor keeps no weights of its own: the K/V projections live in
:class:`~fantasyportrait_core.adapter.PortraitAdapter`, so the transformer's state dict is the
plain Wan one and the adapter's is the published one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn

# Wan's umT5 context is always padded to this many tokens; image tokens come first.
TEXT_CONTEXT_TOKENS = 512


@dataclass
class PortraitCondition:
    """What the portrait branch attends to during one transformer forward.

    Attributes:
        windows: ``[B or 1, F_lat, Lk, proj_dim]`` expression-token windows; ``Lk = N · 97`` for N
            characters (person p owns tokens ``p·97 .. (p+1)·97 - 1``).
        token_person: long ``[Lk]`` person id 1..N of each window token, or ``None`` (one person:
            every latent token sees every window token, as in the reference).
        latent_person: long ``[F_lat, S]`` person id of each latent token (0 = background, no
            portrait tokens), ``S`` = tokens per latent frame; ``None`` iff ``token_person`` is.
        scale: portrait scale multiplying the branch (reference ``ip_scale``); 0 skips it.
    """

    windows: torch.Tensor
    token_person: torch.Tensor | None = None
    latent_person: torch.Tensor | None = None
    scale: float = 1.0

    def __post_init__(self):
        if (self.token_person is None) != (self.latent_person is None):
            raise ValueError("token_person and latent_person must be given together (several characters) or not at all")
        if self.token_person is not None and self.token_person.shape[0] != self.windows.shape[2]:
            raise ValueError(f"token_person has {self.token_person.shape[0]} ids for {self.windows.shape[2]} window tokens")


class PortraitState:
    """Mutable slot shared by all blocks' processors; the sampler sets ``condition`` per forward."""

    def __init__(self):
        self.condition: PortraitCondition | None = None


def portrait_attention_mask(latent_person: torch.Tensor, token_person: torch.Tensor) -> torch.Tensor:
    """Boolean mask ``[F_lat, 1, S, Lk]``: True where latent token and window token share a person.

    Background rows (person 0) are set all-True so SDPA stays finite; their output is zeroed by
    :func:`portrait_branch`.
    """
    same = latent_person[:, :, None] == token_person[None, None, :]
    background = (latent_person == 0)[:, :, None]
    return (same | background)[:, None]


def portrait_branch(
    query: torch.Tensor,
    windows: torch.Tensor,
    k_proj: torch.nn.Module,
    v_proj: torch.nn.Module,
    latent_person: torch.Tensor | None = None,
    token_person: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each latent frame's queries to its own window of expression tokens.

    All latent frames (and all characters) go through one batched SDPA call: latent frames are
    folded into the batch, characters are separated by the boolean mask.

    Args:
        query: ``[B, F_lat·S, H, D]`` normalised cross-attention query (no RoPE), frame-major
            token order as produced by Wan's patch embedding.
        windows: ``[B or 1, F_lat, Lk, proj_dim]`` expression-token windows.
        k_proj, v_proj: ``proj_dim -> H·D`` projections (no bias, no norm on K: reference).
        latent_person, token_person: see :class:`PortraitCondition`.
    Returns:
        ``[B, F_lat·S, H·D]`` in ``query``'s dtype; zero for background latent tokens.
    Raises:
        ValueError: if the query length is not a multiple of the window count.
    """
    b, seq, heads, head_dim = query.shape
    f_lat, lk = windows.shape[1], windows.shape[2]
    if seq % f_lat:
        raise ValueError(f"{seq} latent tokens cannot be split into {f_lat} latent frames")
    s = seq // f_lat
    windows = windows.to(device=query.device, dtype=k_proj.weight.dtype).expand(b, -1, -1, -1)
    key = k_proj(windows).to(query.dtype).view(b * f_lat, lk, heads, head_dim).transpose(1, 2)
    value = v_proj(windows).to(query.dtype).view(b * f_lat, lk, heads, head_dim).transpose(1, 2)
    q = query.reshape(b * f_lat, s, heads, head_dim).transpose(1, 2)

    mask = None
    if token_person is not None:
        latent_person = latent_person.to(query.device)
        mask = portrait_attention_mask(latent_person, token_person.to(query.device))
        mask = mask.repeat(b, 1, 1, 1) if b > 1 else mask
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask)
    out = out.transpose(1, 2).reshape(b, seq, heads * head_dim)
    if latent_person is not None:
        foreground = (latent_person.reshape(1, seq, 1) > 0).to(out.dtype)
        out = out * foreground
    return out


def apply_portrait(query: torch.Tensor, cond: PortraitCondition | None, k_proj: torch.nn.Module,
                   v_proj: torch.nn.Module) -> torch.Tensor | None:
    """The portrait term one block adds to its cross-attention output before the output projection:
    ``scale · portrait_branch(query, ...)``, or ``None`` when there is no condition or the scale is 0.

    The one entry point for every host of the branch (the diffusers processor below and the patch on
    ComfyUI's own Wan model), so the math lives in one place.

    Args:
        query: ``[B, L, H, D]`` normalised cross-attention query of the block.
        cond: the :class:`PortraitCondition` of this forward, or ``None``.
        k_proj, v_proj: that block's adapter projections.
    Returns:
        ``[B, L, H·D]`` in ``query``'s dtype, or ``None``.
    """
    if cond is None or cond.scale == 0.0:
        return None
    out = portrait_branch(query, cond.windows, k_proj, v_proj, cond.latent_person, cond.token_person)
    return out * cond.scale


class PortraitAttnProcessor:
    """diffusers ``WanAttention`` processor for I2V cross-attention plus the portrait branch.

    Computes ``to_out(text + image + scale · portrait)`` exactly as diffusers' ``WanAttnProcessor``
    computes ``to_out(text + image)``; with no condition or scale 0 it is that processor.

    Args:
        k_proj, v_proj: this block's adapter projections (``PortraitAdapter.kv_projections``).
        state: shared :class:`PortraitState` read at call time.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, k_proj: torch.nn.Module, v_proj: torch.nn.Module, state: PortraitState):
        self.k_proj, self.v_proj, self.state = k_proj, v_proj, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        """hidden_states ``[B, L, dim]``; encoder_hidden_states ``[B, 257 + 512, dim]`` (image, text)."""
        image_context = None
        if attn.add_k_proj is not None:
            n_img = encoder_hidden_states.shape[1] - TEXT_CONTEXT_TOKENS
            image_context = encoder_hidden_states[:, :n_img]
            encoder_hidden_states = encoder_hidden_states[:, n_img:]

        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend)
        out = out.flatten(2, 3).type_as(query)

        if image_context is not None:
            key_img = attn.norm_added_k(attn.add_k_proj(image_context)).unflatten(2, (attn.heads, -1))
            value_img = attn.add_v_proj(image_context).unflatten(2, (attn.heads, -1))
            out_img = dispatch_attention_fn(query, key_img, value_img, backend=self._attention_backend)
            out = out + out_img.flatten(2, 3).type_as(query)

        portrait = apply_portrait(query, self.state.condition, self.k_proj, self.v_proj)
        if portrait is not None:
            out = out + portrait

        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def attach_portrait_processors(transformer, adapter) -> PortraitState:
    """Install :class:`PortraitAttnProcessor` in every block's cross-attention (``attn2``).

    Args:
        transformer: diffusers ``WanTransformer3DModel`` (I2V).
        adapter: :class:`~fantasyportrait_core.adapter.PortraitAdapter` with one K/V pair per block.
    Returns:
        The :class:`PortraitState` the processors share.
    Raises:
        ValueError: if block counts or widths disagree.
    """
    blocks = transformer.blocks
    if len(blocks) != adapter.num_layers:
        raise ValueError(f"portrait adapter has {adapter.num_layers} blocks, the transformer has {len(blocks)}")
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    if inner != adapter.dim:
        raise ValueError(f"portrait adapter width {adapter.dim} does not match transformer width {inner}")
    state = PortraitState()
    for i, block in enumerate(blocks):
        k_proj, v_proj = adapter.kv_projections(i)
        block.attn2.set_processor(PortraitAttnProcessor(k_proj, v_proj, state))
    return state

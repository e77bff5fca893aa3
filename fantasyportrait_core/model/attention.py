"""Portrait branch of the Wan cross-attention, masked per character.

Formulation: FantasyPortrait §3.2–3.3 and the reference ``SingleStreamBlockProcessor``
(``diffsynth/pipelines/wan_video.py``): in every block the normalised cross-attention query
attends, one latent frame at a time, to that latent frame's window of expression tokens through
the adapter's K/V projections; the result times the portrait scale is added to the text and image
branches before the output projection. With several characters a boolean mask lets each latent
token see only the tokens of the person whose face region holds it. Unlike the reference (whose
mask lets background tokens see every person's tokens), background tokens get no portrait branch.

FlashPortrait (arXiv 2512.16900) is the same branch with one family option: its "Normalized Facial
Expression Block" rescales the branch to the statistics of the text + image output
(:func:`normalize_expression`, ``base=`` of :func:`apply_portrait`); its per-block ``emo_{k,v}_proj``
sit in the adapter's K/V slots (:mod:`fantasyportrait_core.model.adapter`).

The processor keeps no weights of its own: the K/V projections live in
:class:`~fantasyportrait_core.model.adapter.PortraitAdapter`, so the transformer's state dict is the
plain Wan one and the adapter's is the published one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    The device-ready form (:meth:`prepared`) is built once per device, dtype and batch layout and
    cached on the condition, so masks and casts are not rebuilt in every block of every forward.
    """

    windows: torch.Tensor
    token_person: torch.Tensor | None = None
    latent_person: torch.Tensor | None = None
    scale: float = 1.0
    _prepared: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if (self.token_person is None) != (self.latent_person is None):
            raise ValueError("token_person and latent_person must be given together (several characters) or not at all")
        if self.token_person is not None and self.token_person.shape[0] != self.windows.shape[2]:
            raise ValueError(f"token_person has {self.token_person.shape[0]} ids for {self.windows.shape[2]} window tokens")

    def prepared(self, device, dtype: torch.dtype, proj_dtype: torch.dtype | None = None, rows: int = 1,
                 scale: float | None = None) -> "PreparedPortrait":
        """The condition on ``device`` for a forward whose leading ``rows`` batch rows get the branch.

        Args:
            device: the transformer's compute device.
            dtype: compute dtype of the query (bf16/fp16/fp32): the background mask is kept in it.
            proj_dtype: dtype of the adapter's K/V projection weights (default ``dtype``); the
                windows are cast to it once here.
            rows: leading batch rows that get the portrait branch (the others get none).
            scale: overrides :attr:`scale` (e.g. 0 for a guidance pass without the portrait).
        Returns:
            :class:`PreparedPortrait`, cached per (device, dtypes, rows); the scale tensor is made
            per call (cheap) so the cache holds no per-pass state.
        Raises:
            ValueError: if windows carry a batch other than 1 or ``rows``.
        """
        device = torch.device(device)
        proj_dtype = proj_dtype or dtype
        if self.windows.shape[0] not in (1, rows):
            raise ValueError(f"portrait windows have batch {self.windows.shape[0]} for {rows} batch row(s)")
        key = (device, dtype, proj_dtype, rows)
        base = self._prepared.get(key)
        if base is None:
            windows = self.windows.to(device=device, dtype=proj_dtype)
            mask = foreground = persons = None
            if self.token_person is not None:
                latent_person = self.latent_person.to(device)
                mask = portrait_attention_mask(latent_person, self.token_person.to(device))
                mask = mask.repeat(rows, 1, 1, 1) if rows > 1 else mask.contiguous()
                foreground = (latent_person.reshape(1, -1, 1) > 0).to(dtype)
                people = int(self.token_person.max())
                persons = F.one_hot(latent_person.reshape(-1), people + 1)[:, 1:].to(torch.float32)[None]
                # Window length (N·97) varies with the character count: keep it symbolic under
                # torch.compile so a new count does not recompile (see PERFORMANCE.md).
                torch._dynamo.maybe_mark_dynamic(mask, 3)
            torch._dynamo.maybe_mark_dynamic(windows, 2)
            base = PreparedPortrait(windows, mask, foreground, torch.ones((), device=device), rows, persons)
            if len(self._prepared) >= 4:  # a few layouts (e.g. batched and single passes), not a leak
                self._prepared.clear()
            self._prepared[key] = base
        value = self.scale if scale is None else scale
        return PreparedPortrait(base.windows, base.mask, base.foreground,
                                torch.full((), float(value), device=device, dtype=torch.float32), rows, base.persons)

    def select_frames(self, frames) -> "PortraitCondition":
        """The condition of the given latent frames, in that order (a context window's frames).

        Args:
            frames: latent frame indices (ints, repeats allowed, e.g. ``[0, 8, 9, ...]`` for a window
                anchored on frame 0).
        Returns:
            a new :class:`PortraitCondition`: ``windows[:, frames]`` and ``latent_person[frames]``;
            token ids and scale unchanged.
        Raises:
            IndexError: for a frame outside ``0 .. F_lat-1``.
        """
        frames = [int(f) for f in frames]
        if any(not 0 <= f < self.windows.shape[1] for f in frames):
            raise IndexError(f"latent frames {frames[:4]}... outside the condition's {self.windows.shape[1]}")
        idx = torch.as_tensor(frames, dtype=torch.long)
        lp = None if self.latent_person is None else self.latent_person[idx.to(self.latent_person.device)]
        return PortraitCondition(self.windows[:, idx.to(self.windows.device)], self.token_person, lp, self.scale)


@dataclass(frozen=True)
class PreparedPortrait:
    """Device-ready :class:`PortraitCondition` (built by :meth:`PortraitCondition.prepared`).

    Everything a block needs is already on the compute device in the right dtype; nothing here is
    a Python number that changes between calls, so ``torch.compile`` builds one graph for any
    scale (a 0-d tensor) and any character count (dynamic window length).

    Attributes:
        windows: ``[1 or rows, F_lat, Lk, proj_dim]`` in the projections' dtype.
        mask: bool ``[rows·F_lat, 1, S, Lk]`` (:func:`portrait_attention_mask`), or ``None`` (one person).
        foreground: ``[1, F_lat·S, 1]`` 1 for face tokens, 0 for background (compute dtype), or ``None``.
        scale: float32 0-d tensor.
        rows: leading batch rows of the forward that get the branch.
        persons: float32 one-hot ``[1, F_lat·S, N]`` of each latent token's person (zero rows for the
            background), or ``None`` (one person); used by the FlashPortrait normalisation.
    """

    windows: torch.Tensor
    mask: torch.Tensor | None
    foreground: torch.Tensor | None
    scale: torch.Tensor
    rows: int
    persons: torch.Tensor | None = None


class PortraitState:
    """Mutable slot shared by all blocks' processors; the sampler sets ``condition`` per forward
    (a :class:`PortraitCondition`, or its :class:`PreparedPortrait` form)."""

    def __init__(self):
        self.condition: PortraitCondition | PreparedPortrait | None = None
        self.parallel = None  # runtime.parallel.ParallelRun under torchrun --parallel, else None


def portrait_attention_mask(latent_person: torch.Tensor, token_person: torch.Tensor) -> torch.Tensor:
    """Boolean mask ``[F_lat, 1, S, Lk]``: True where latent token and window token share a person.

    Background rows (person 0) are set all-True so SDPA stays finite; their output is zeroed by
    :func:`portrait_branch`.
    """
    same = latent_person[:, :, None] == token_person[None, None, :]
    background = (latent_person == 0)[:, :, None]
    return (same | background)[:, None]


def projection_dtype(proj: torch.nn.Module, fallback: torch.dtype) -> torch.dtype:
    """dtype of a projection's weight (what its input must be cast to), or ``fallback`` for fp8 or
    weightless modules."""
    w = getattr(proj, "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() and w.element_size() > 1 else fallback


# FlashPortrait's Normalized Facial Expression Block divides by ``std + 1e-5``
# (``wan/models/wan_transformer3d.py`` ``WanI2VCrossAttention.forward``, Francis-Rings/FlashPortrait c72d9de).
EXPRESSION_NORM_EPS = 1e-5


def normalize_expression(branch: torch.Tensor, base: torch.Tensor, persons: torch.Tensor | None = None) -> torch.Tensor:
    """FlashPortrait's Normalized Facial Expression Block (arXiv 2512.16900; reference
    ``WanI2VCrossAttention.forward`` in FlashPortrait ``wan/models/wan_transformer3d.py``): the expression
    attention output is rescaled, per batch row, to the mean and standard deviation of the text +
    image attention output::

        branch' = (branch − mean(branch)) · std(base) / (std(branch) + 1e-5) + mean(base)

    with mean/std over all tokens and channels of the row (``dim=(1, 2)``; unbiased std, as
    ``torch.std``). Statistics are taken in float32 and the result is cast back to ``branch``'s dtype
    (fp32 inputs give the reference's numbers; bf16 inputs get fp32 accumulation).

    Several characters (ours; FlashPortrait has one): ``mean(branch)``/``std(branch)`` are taken per
    character over that character's face tokens (``persons``), so one character's expression tokens
    cannot change another character's region through the statistics; ``mean(base)``/``std(base)``
    stay whole-row. Background tokens get an arbitrary value here and are zeroed by the caller.

    Args:
        branch: ``[B, L, C]`` unscaled expression attention output.
        base: ``[B, L, C]`` text + image cross-attention output of the same rows (before ``o``).
        persons: float32 one-hot ``[1, L, N]`` person of each token (all-zero row = background), or
            ``None`` for one character (whole-row statistics, FlashPortrait's formula).
    Returns:
        ``[B, L, C]`` in ``branch``'s dtype.
    """
    b32, x32 = branch.float(), base.float()
    mean_x, std_x = x32.mean(dim=(1, 2), keepdim=True), x32.std(dim=(1, 2), keepdim=True)
    if persons is None:
        mean_b, std_b = b32.mean(dim=(1, 2), keepdim=True), b32.std(dim=(1, 2), keepdim=True)
    else:  # per-character mean / unbiased std over its tokens and channels, scattered back per token
        persons = persons.to(b32.device)
        count = (persons.sum(dim=1) * b32.shape[2]).clamp_min(2.0)  # [1, N] elements per character
        mean_p = torch.einsum("bl,bln->bn", b32.sum(dim=2), persons.expand(b32.shape[0], -1, -1)) / count
        mean_b = torch.einsum("bn,ln->bl", mean_p, persons[0])[..., None]
        sq = ((b32 - mean_b) ** 2).sum(dim=2)
        std_p = (torch.einsum("bl,bln->bn", sq, persons.expand(b32.shape[0], -1, -1)) / (count - 1)).sqrt()
        background = 1.0 - persons[0].sum(dim=1)  # [L]: keeps background values small (zeroed later)
        std_b = (torch.einsum("bn,ln->bl", std_p, persons[0]) + background)[..., None]
    return ((b32 - mean_b) * (std_x / (std_b + EXPRESSION_NORM_EPS)) + mean_x).to(branch.dtype)


def _branch(query: torch.Tensor, cond: PreparedPortrait, k_proj: torch.nn.Module, v_proj: torch.nn.Module,
            base: torch.Tensor | None = None) -> torch.Tensor:
    """Unscaled portrait branch for ``query [rows, F_lat·S, H, D]`` (see :func:`portrait_branch`);
    with ``base`` (``[rows, F_lat·S, H·D]`` text + image output) normalised by
    :func:`normalize_expression` before the background is zeroed."""
    b, seq, heads, head_dim = query.shape
    windows = cond.windows
    f_lat, lk = windows.shape[1], windows.shape[2]
    if seq % f_lat:
        raise ValueError(f"{seq} latent tokens cannot be split into {f_lat} latent frames")
    s = seq // f_lat
    # K/V of a batch-1 condition are projected once and shared by every row.
    kb = windows.shape[0]
    key = k_proj(windows).to(query.dtype).view(kb, f_lat, lk, heads, head_dim)
    value = v_proj(windows).to(query.dtype).view(kb, f_lat, lk, heads, head_dim)
    if kb != b:
        key, value = key.expand(b, -1, -1, -1, -1), value.expand(b, -1, -1, -1, -1)
    key = key.reshape(b * f_lat, lk, heads, head_dim).transpose(1, 2)
    value = value.reshape(b * f_lat, lk, heads, head_dim).transpose(1, 2)
    q = query.reshape(b * f_lat, s, heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=cond.mask)
    out = out.transpose(1, 2).reshape(b, seq, heads * head_dim)
    if base is not None:
        # One character: statistics over every latent token of the row (FlashPortrait's block);
        # several: per character over its face tokens, the background is zeroed below.
        out = normalize_expression(out, base, cond.persons)
    if cond.foreground is not None:
        out = out * cond.foreground
    return out


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
    cond = PortraitCondition(windows, token_person, latent_person)
    prep = cond.prepared(query.device, query.dtype, projection_dtype(k_proj, query.dtype), rows=query.shape[0])
    return _branch(query, prep, k_proj, v_proj)


def sequence_shard(parallel_config, local_tokens: int) -> tuple[int, int] | None:
    """``(start, total)`` of the tokens this process holds under diffusers' context parallelism
    (``parallel_config``: the ``ParallelConfig`` diffusers sets on every attention processor), or
    ``None`` without it. diffusers' equipartition sharder gives rank ``r`` of the flattened ring x
    Ulysses mesh the ``r``-th of ``N`` equal chunks of the token axis (``tensor.chunk``), so rank ``r``
    holds tokens ``r·n .. (r+1)·n - 1`` of ``N·n``.

    Raises:
        ValueError: the uneven ``ulysses_anything``/``ring_anything`` sharders (offsets unknown here).
    """
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        return None
    if cp.ulysses_anything or cp.ring_anything:
        raise ValueError("the portrait branch needs equal token shards; ulysses_anything/ring_anything are not supported")
    mesh = cp._flattened_mesh
    rank = torch.distributed.get_rank(mesh.get_group())
    return rank * local_tokens, mesh.size() * local_tokens


def _shard_branch(query: torch.Tensor, cond: PreparedPortrait, k_proj, v_proj, start: int, total: int) -> torch.Tensor:
    """:func:`_branch` for a contiguous shard ``[start, start + n)`` of the ``total`` frame-major latent
    tokens (context parallelism): the shard is padded with zero queries to whole latent frames, the
    windows and the per-person mask are sliced to those frames, and the padding is cut off again, so
    each token attends to its own frame's expression tokens exactly as in the whole sequence."""
    b, n = query.shape[:2]
    f_lat = cond.windows.shape[1]
    if total % f_lat:
        raise ValueError(f"{total} latent tokens cannot be split into {f_lat} latent frames")
    s = total // f_lat
    f0, f1 = start // s, (start + n - 1) // s + 1
    front, back = start - f0 * s, f1 * s - start - n
    q = F.pad(query, (0, 0, 0, 0, front, back))
    mask = cond.mask
    if mask is not None:
        mask = mask.view(-1, f_lat, *mask.shape[1:])[:, f0:f1].reshape(-1, *mask.shape[1:])
    sub = PreparedPortrait(cond.windows[:, f0:f1], mask, None, cond.scale, cond.rows)
    out = _branch(q, sub, k_proj, v_proj)[:, front:front + n]
    if cond.foreground is not None:
        out = out * cond.foreground[:, start:start + n]
    return out


def apply_portrait(query: torch.Tensor, cond: PortraitCondition | PreparedPortrait | None, k_proj: torch.nn.Module,
                   v_proj: torch.nn.Module, shard: tuple[int, int] | None = None,
                   base: torch.Tensor | None = None) -> torch.Tensor | None:
    """The portrait term one block adds to its cross-attention output before the output projection:
    ``scale · portrait_branch(query, ...)``, or ``None`` when there is no condition.

    The one entry point for every host of the branch (the diffusers processor below and the patch on
    ComfyUI's own Wan model), so the math lives in one place.

    Args:
        query: ``[B, L, H, D]`` normalised cross-attention query of the block.
        cond: the :class:`PortraitCondition` of this forward (every row gets the branch; prepared
            on first use and cached; scale 0 returns ``None``), its :class:`PreparedPortrait` form
            (the leading ``cond.rows`` rows get the branch; no Python-level branching, so it
            compiles to one graph), or ``None``.
        k_proj, v_proj: that block's adapter projections (FantasyPortrait's
            ``ip_adapter_single_stream_{k,v}_proj`` or FlashPortrait's ``emo_{k,v}_proj``).
        shard: ``(start, total)`` when ``query`` holds only tokens ``start .. start + L - 1`` of
            ``total`` (diffusers context parallelism, :func:`sequence_shard`); ``None``: all tokens.
        base: FlashPortrait family only: ``[B or rows, L, H·D]`` text + image attention output of the
            block (before ``o``); the branch is then rescaled to its statistics
            (:func:`normalize_expression`). ``None`` (FantasyPortrait) leaves the branch as is.
    Returns:
        ``[rows, L, H·D]`` in ``query``'s dtype for the leading ``rows`` batch rows (all ``B`` rows
        for a plain :class:`PortraitCondition`), or ``None``.
    """
    if cond is None:
        return None
    if isinstance(cond, PortraitCondition):
        if cond.scale == 0.0:
            return None
        cond = cond.prepared(query.device, query.dtype, projection_dtype(k_proj, query.dtype), rows=query.shape[0])
    if cond.rows != query.shape[0]:
        query = query[:cond.rows]
    if base is not None and base.shape[0] != cond.rows:
        base = base[:cond.rows]
    if shard is not None:
        if base is not None:
            raise ValueError("FlashPortrait's normalized expression block needs the statistics of every token; "
                             "sequence parallelism splits them: use --parallel cfg with FlashPortrait")
        return _shard_branch(query, cond, k_proj, v_proj, *shard) * cond.scale
    return _branch(query, cond, k_proj, v_proj, base) * cond.scale


class PortraitAttnProcessor:
    """diffusers ``WanAttention`` processor for I2V cross-attention plus the portrait branch.

    Computes ``to_out(text + image + scale · portrait)`` exactly as diffusers' ``WanAttnProcessor``
    computes ``to_out(text + image)``; with no condition or scale 0 it is that processor.

    Args:
        k_proj, v_proj: this block's adapter projections (``PortraitAdapter.kv_projections``).
        state: shared :class:`PortraitState` read at call time.
        normalize: FlashPortrait family: rescale the portrait term to the text + image output
            (:func:`normalize_expression`) before adding it.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, k_proj: torch.nn.Module, v_proj: torch.nn.Module, state: PortraitState, normalize: bool = False):
        self.k_proj, self.v_proj, self.state, self.normalize = k_proj, v_proj, state, normalize

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

        shard = None if self._parallel_config is None else sequence_shard(self._parallel_config, query.shape[1])
        portrait = apply_portrait(query, self.state.condition, self.k_proj, self.v_proj, shard,
                                  base=out if self.normalize else None)
        if portrait is not None:
            rows = portrait.shape[0]
            out = out + portrait if rows == out.shape[0] else torch.cat([out[:rows] + portrait, out[rows:]])

        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def attach_portrait_processors(transformer, adapter) -> PortraitState:
    """Install :class:`PortraitAttnProcessor` in every block's cross-attention (``attn2``).

    Args:
        transformer: diffusers ``WanTransformer3DModel`` (I2V).
        adapter: :class:`~fantasyportrait_core.model.adapter.PortraitAdapter` with one K/V pair per block.
    Returns:
        The :class:`PortraitState` the processors share.
    The adapter's family decides the math: FlashPortrait adapters (``adapter.normalize_expression``)
    get the Normalized Facial Expression Block, FantasyPortrait's the plain additive branch.

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
    normalize = getattr(adapter, "normalize_expression", False)
    for i, block in enumerate(blocks):
        k_proj, v_proj = adapter.kv_projections(i)
        block.attn2.set_processor(PortraitAttnProcessor(k_proj, v_proj, state, normalize=normalize))
    return state

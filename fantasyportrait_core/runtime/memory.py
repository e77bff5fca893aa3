"""GPU memory model of one sampling forward, and the plan it picks: weight storage (bf16 / fp8),
block offload, and how many guidance passes share a forward.

The memory model (bytes on the GPU while the transformer runs)::

    peak = weights_on_gpu
         + rows · (act_bytes(tokens) + context_tokens · dim · e · 4)
         + portrait_rows · tokens · Lk · (1 + e)      # boolean mask + SDPA's additive bias (N ≥ 2)
         + rows · tokens · heads · 4                  # fused attention's log-sum-exp
         + reserve

    act_bytes(tokens) = e · tokens · max(ACT_ATTN · dim,                   # attention-phase peak
                                         ACT_FFN · dim + 2 · ffn_dim)       # FFN-phase peak

* ``weights_on_gpu``: every transformer weight plus the portrait adapter's per-block K/V
  projections (839 M parameters at 14B) when resident; with block offload the weights outside the
  blocks plus three blocks with their K/V projections (the block computing, the next one
  streaming in, and the last one, whose memory the allocator reuses only once the compute stream
  has passed it: :func:`~fantasyportrait_core.runtime.residency.enable_block_offload` records the streams
  and streams the adapter's K/V with their block).
* ``rows``: guidance passes in one forward (batch rows); ``tokens = F_lat · H/16 · W/16`` per row
  (a context window's frames at most); ``e``: bytes per element of the compute dtype (2 for bf16).
* ``act_bytes``: the live activations at a block's peak, the larger of two phases. Around
  self-attention (residual stream, fp32 LayerNorm/modulation temporaries, q/k/v, RMSNorm and RoPE
  temporaries) ``ACT_ATTN = 11.1`` tensors of width ``dim`` per token are alive; around the FFN
  ``ACT_FFN = 4.33`` of width ``dim`` plus both ``ffn_dim``-wide intermediates. Both coefficients
  are measured with PyTorch's CPU allocator (``benchmarks/bench_memory.py``): at the 14B widths
  the peak is in the attention phase (113.7 KB per token; running the FFN in token chunks left it
  unchanged), in a dim-1536 / ffn-8960 model it is in the FFN (49.2 KB per token).
  They predict the H100 bf16 peaks of the bare 14B forward in ``../shared/reference/README.md``
  (32.9 / 34.1 / 38.7 GiB at 21,504 / 32,760 / 75,600 tokens: 115 KB per token above the weights)
  within 1 %, and its fp8 and fp8 + block-offload peaks within 3 %.
* ``reserve``: allocator slack and cuBLAS/cuDNN workspaces: 0.75 GiB + 10 % of the activations.

Plan order (first that fits wins): the stored weights resident with all passes batched, fewer
passes per forward, fp8 storage resident (when storage is ``auto``), then block offload (fp8 before
bf16). Each option keeps the largest pass batch that fits.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
ACT_ATTN = 11.1  # width-`dim` tensors alive per token at the attention-phase peak (measured, see above)
ACT_FFN = 4.33  # width-`dim` tensors alive per token around the FFN, besides its 2 wide intermediates
RESERVE_BYTES = int(0.75 * GIB)
RESERVE_ACT_FRACTION = 0.10
CONTEXT_TOKENS = 512 + 257  # umT5 text + CLIP image tokens of Wan2.1 I2V
WINDOW_TOKENS = 97  # expression tokens per character per latent frame

STORAGES = ("bf16", "fp8")
OFFLOADS = ("none", "block")


@dataclass(frozen=True)
class ModelSize:
    """Byte counts of a Wan transformer + portrait adapter that the plan needs.

    Attributes:
        dim, ffn_dim, heads, layers: transformer widths (config).
        block_bytes: bytes of all blocks per storage (``{"bf16": …, "fp8": …}``).
        other_bytes: weights outside the blocks (embeddings, head; kept in the compute dtype).
        adapter_kv_bytes: the adapter's K/V projections (on the GPU while sampling).
        elem: bytes per element of the compute dtype.
    """

    dim: int
    ffn_dim: int
    heads: int
    layers: int
    block_bytes: dict
    other_bytes: int
    adapter_kv_bytes: int
    elem: int = 2

    def weights(self, storage: str, offload: str, blocks_on_gpu: int = 3) -> int:
        """Transformer + adapter K/V bytes on the GPU for this storage and offload. Block offload
        streams each block with its adapter K/V; with ``record_stream`` (ours:
        :func:`~fantasyportrait_core.runtime.residency.enable_block_offload`) up to three are on the GPU at
        a time (computing, next in flight, the last until the compute stream passes it); diffusers'
        default (no ``record_stream``, a compute-stream sync per block) holds two."""
        blocks = self.block_bytes[storage] + self.adapter_kv_bytes
        return self.other_bytes + (blocks if offload == "none" else blocks_on_gpu * blocks // self.layers)


def model_size(config: dict, proj_dim: int = 2048, elem: int = 2) -> ModelSize:
    """:class:`ModelSize` of a Wan2.1-I2V config (diffusers ``WanTransformer3DModel`` keys), from
    the parameter shapes of the model built on the meta device (no memory used).

    fp8 storage keeps the blocks' linear weights in 1 byte (:mod:`fantasyportrait_core.model.fp8`) and
    everything else in the compute dtype.
    """
    import torch

    from fantasyportrait_core.model.build import build_transformer

    model = build_transformer(config, empty=True)
    block_params = sum(p.numel() for p in model.blocks.parameters())
    linear = sum(m.weight.numel() for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
    other = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("blocks."))
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    return ModelSize(dim=dim, ffn_dim=config["ffn_dim"], heads=config["num_attention_heads"],
                     layers=config["num_layers"],
                     block_bytes={"bf16": block_params * elem, "fp8": linear + (block_params - linear) * elem},
                     other_bytes=other * elem, adapter_kv_bytes=2 * config["num_layers"] * proj_dim * dim * elem,
                     elem=elem)


def tokens_per_forward(width: int, height: int, frames: int, context_frames: int | None = None) -> int:
    """Latent tokens of one batch row: ``F_lat · (H/16) · (W/16)``, ``F_lat = (frames − 1)/4 + 1``
    (frames capped at the context window the sampler denoises at once).

    Raises:
        ValueError: for sizes that are not multiples of 16 or frame counts < 1.
    """
    if width % 16 or height % 16 or width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive multiples of 16, got {width}x{height}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if context_frames is not None:
        frames = min(frames, context_frames)
    from fantasyportrait_core.model.geometry import video_tokens

    return video_tokens(frames, width, height)


def activation_bytes(size: ModelSize, tokens: int, rows: int = 1, portrait_rows: int = 1, people: int = 1) -> int:
    """Activation + attention-workspace bytes of one forward (the non-weight terms of the model in
    the module docstring, without the reserve)."""
    e = size.elem
    act = e * tokens * max(ACT_ATTN * size.dim, ACT_FFN * size.dim + 2 * size.ffn_dim)
    total = rows * (act + CONTEXT_TOKENS * size.dim * e * 4)
    total += rows * tokens * size.heads * 4
    if people > 1:
        total += portrait_rows * tokens * people * WINDOW_TOKENS * (1 + e)
    return int(total)


def peak_bytes(size: ModelSize, storage: str, offload: str, tokens: int, rows: int = 1, portrait_rows: int = 1,
               people: int = 1) -> int:
    """Predicted GPU peak of sampling (module docstring), reserve included."""
    act = activation_bytes(size, tokens, rows, portrait_rows, people)
    return int(size.weights(storage, offload) + act * (1 + RESERVE_ACT_FRACTION) + RESERVE_BYTES)


@dataclass(frozen=True)
class MemoryPlan:
    """What :func:`plan_memory` chose.

    Attributes:
        storage: ``"bf16"`` (the compute dtype) or ``"fp8"`` block weights.
        offload: ``"none"`` (all weights on the GPU) or ``"block"`` (streamed block by block).
        batch_passes: guidance passes per forward (1 .. passes).
        peak_bytes: predicted GPU peak; free_bytes: the free memory planned against (None: no GPU).
        fits: False when even the smallest option is predicted not to fit (it is still returned).
        tokens, people, passes: the job planned for.
    """

    storage: str
    offload: str
    batch_passes: int
    peak_bytes: int
    free_bytes: int | None
    fits: bool
    tokens: int
    people: int
    passes: int

    def describe(self) -> str:
        """One line for the log and the node's info output."""
        free = "no GPU" if self.free_bytes is None else f"{self.free_bytes / GIB:.1f} GiB free"
        warn = "" if self.fits else " — predicted NOT to fit: lower the size or length"
        return (f"memory plan: {self.storage} weights, offload {self.offload}, {self.batch_passes} of {self.passes} "
                f"guidance pass(es) per forward; predicted peak {self.peak_bytes / GIB:.1f} GiB of {free} "
                f"({self.tokens} tokens, {self.people} character(s)){warn}")


def plan_memory(size: ModelSize, tokens: int, free_bytes: int | None, passes: int = 1, people: int = 1,
                portrait_passes: int = 1, storage: str = "auto", offload: str = "auto") -> MemoryPlan:
    """Pick storage, offload and pass batching for one job (order in the module docstring).

    Args:
        size: :func:`model_size` (or measured byte counts).
        tokens: :func:`tokens_per_forward`.
        free_bytes: GPU memory available to sampling (free + what the host can unload), or ``None``
            when there is no GPU (then: weights as stored, no offload, all passes batched).
        passes: guidance passes per step (1–3); portrait_passes: how many of them carry the portrait.
        people: characters (masks from 2 on).
        storage: ``"auto"``, ``"bf16"`` or ``"fp8"`` (fixed: the weights are already so).
        offload: ``"auto"``, ``"none"`` or ``"block"``.
    Raises:
        ValueError: unknown storage/offload names or counts < 1.
    """
    if storage not in ("auto", *STORAGES):
        raise ValueError(f"storage {storage!r} is unknown; choose auto, bf16 or fp8")
    if offload not in ("auto", *OFFLOADS):
        raise ValueError(f"offload {offload!r} is unknown; choose auto, none or block")
    if passes < 1 or people < 1 or tokens < 1:
        raise ValueError(f"passes, people and tokens must be >= 1, got {passes}, {people}, {tokens}")
    storages = STORAGES if storage == "auto" else (storage,)
    offloads = OFFLOADS if offload == "auto" else (offload,)
    if free_bytes is None:
        st = storages[0]
        peak = peak_bytes(size, st, offloads[0], tokens, passes, portrait_passes, people)
        return MemoryPlan(st, offloads[0], passes, peak, None, True, tokens, people, passes)
    options = [(st, off) for off in offloads for st in (storages if off == "none" else storages[::-1])]
    smallest = None
    for st, off in options:
        for rows in range(passes, 0, -1):
            peak = peak_bytes(size, st, off, tokens, rows, min(portrait_passes, rows), people)
            plan = MemoryPlan(st, off, rows, peak, free_bytes, peak <= free_bytes, tokens, people, passes)
            if plan.fits:
                return plan
            if smallest is None or peak < smallest.peak_bytes:
                smallest = plan
    return smallest


def tensor_bytes(tensors) -> int:
    """Bytes held by ``tensors`` (numel x element size; int): the one byte count of the pack."""
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers (int): what moving it to a device or pinning it costs."""
    return tensor_bytes((*module.parameters(), *module.buffers()))


def measured_size(transformer, adapter=None) -> ModelSize:
    """:class:`ModelSize` of a loaded model from its tensors (both storages: the fp8 figure assumes
    the blocks' linear weights at 1 byte; for an fp8 model the bf16 figure assumes 2)."""
    import torch

    from fantasyportrait_core.model.fp8 import ScaledFP8Linear

    nbytes = module_bytes
    cfg = transformer.config
    p = transformer.patch_embedding.weight
    elem = p.element_size()
    streamed = {id(t) for b in transformer.blocks if hasattr(b, "portrait_kv") for t in b.portrait_kv.parameters()}
    blocks = nbytes(transformer.blocks) - tensor_bytes(t for b in transformer.blocks if hasattr(b, "portrait_kv")
                                                       for t in b.portrait_kv.parameters())
    layers = [m for m in transformer.blocks.modules() if isinstance(m, (torch.nn.Linear, ScaledFP8Linear))
              and id(m.weight) not in streamed]
    stored = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    n_fp8 = sum(isinstance(m, ScaledFP8Linear) for m in layers)  # each has a 4-byte scale
    as_fp8 = blocks - stored + sum(m.weight.numel() for m in layers) + 4 * (len(layers) - n_fp8)
    as_bf16 = blocks - stored + sum(m.weight.numel() * elem for m in layers) - 4 * n_fp8
    kv = 0
    if adapter is not None:
        kv = tensor_bytes(t for i in range(adapter.num_layers) for m in adapter.kv_projections(i)
                          for t in m.parameters())
    return ModelSize(dim=cfg.num_attention_heads * cfg.attention_head_dim, ffn_dim=cfg.ffn_dim,
                     heads=cfg.num_attention_heads, layers=cfg.num_layers, block_bytes={"bf16": as_bf16, "fp8": as_fp8},
                     other_bytes=nbytes(transformer) - nbytes(transformer.blocks), adapter_kv_bytes=kv, elem=elem)


# The job `storage = auto` is decided for at load time (the size is not known yet): Wan2.1's native
# 720p × 81 frames, the reference guidance (cfg 1, portrait cfg 4: 2 passes), one pass per forward.
PLANNING_JOB = dict(width=1280, height=720, frames=81, passes=2, people=1)


def choose_storage(size: ModelSize, free_bytes: int | None) -> MemoryPlan:
    """bf16 or fp8 block weights for :data:`PLANNING_JOB` on ``free_bytes``: bf16 when it fits
    resident with one pass per forward, else fp8 (no GPU: bf16). The plan is returned for its
    description; offload and pass batching are decided per prompt by :func:`plan_memory`."""
    job = PLANNING_JOB
    tokens = tokens_per_forward(job["width"], job["height"], job["frames"])
    if free_bytes is None:
        return plan_memory(size, tokens, None, 1, job["people"], 1, storage="bf16", offload="none")
    bf16 = plan_memory(size, tokens, free_bytes, 1, job["people"], 1, storage="bf16", offload="none")
    if bf16.fits:
        return bf16
    return plan_memory(size, tokens, free_bytes, 1, job["people"], 1, storage="fp8", offload="auto")



def plan_sampling(size: ModelSize, width: int, height: int, num_frames: int, free_bytes: int | None,
                  passes: list, people: int = 1, storage: str = "auto", offload: str = "auto",
                  long_video: str = "auto", context_frames: int = 81, anchored: bool = True):
    """One pass or context windows, and the memory plan for that choice: what the sampler node and
    the CLI run before sampling.

    Long videos go in one pass (as the reference) when :func:`plan_memory` finds an option that fits
    the whole video's tokens, else in windows of ``context_frames``
    (:func:`~fantasyportrait_core.sampling.windows.plan_context`); an anchored window
    (``window_anchor = "reference"``) carries one latent frame more.

    Args:
        size: :func:`measured_size` of the loaded model; width, height: pixels (multiples of 16);
        num_frames: pixel frames (4k+1); free_bytes: as :func:`plan_memory` (``None``: no GPU, then
            one pass unless ``long_video = "windows"``).
        passes: :func:`~fantasyportrait_core.sampling.guidance.guidance_passes` of the step with the most passes.
        people: characters; storage, offload: as :func:`plan_memory`;
        long_video: ``"auto"``, ``"one_pass"`` or ``"windows"``; context_frames: window length.
    Returns:
        ``(window, plan)``: window length in pixel frames (``None`` = one pass) and the
        :class:`MemoryPlan` for one forward over it.
    Raises:
        ValueError: as :func:`plan_memory` and :func:`~fantasyportrait_core.sampling.windows.plan_context`.
    """
    from fantasyportrait_core.sampling.windows import plan_context

    def plan_for(window):
        frames = num_frames if window is None else min(num_frames, window + 4 * bool(anchored))
        return plan_memory(size, tokens_per_forward(width, height, frames), free_bytes, passes=len(passes),
                           people=people, portrait_passes=sum(bool(w) for _, w in passes), storage=storage,
                           offload=offload)

    whole = plan_for(None)  # one pass over the whole video: what plan_context asks about
    window = plan_context(num_frames, long_video, context_frames,
                          None if free_bytes is None else (lambda _frames: whole.fits))
    return window, (whole if window is None else plan_for(window))


@dataclass(frozen=True)
class MemoryKnobs:
    """How a host names the settings that lower GPU memory (the CLI's flags, the nodes' widgets), so
    :func:`oom_advice` says what to change in the user's own words."""

    fp8: str
    offload: str
    size: str
    length: str
    context: str


CLI_KNOBS = MemoryKnobs("--fp8", "--offload block", "--max-size", "--frames", "--context-frames")
NODE_KNOBS = MemoryKnobs("in FantasyPortrait Model Loader storage = fp8_e4m3fn", "offload = block",
                         "the size", "the length", "context_frames (long_video = windows)")


def oom_advice(tried: str, knobs: MemoryKnobs, fp8: bool = False) -> str:
    """The one message for a generation that ran out of GPU memory: what was tried, what to change.

    Args:
        tried: the settings that ran out, in the host's words (e.g. ``"--max-size 720, --frames 81"``).
        knobs: the host's names of the memory settings (:data:`CLI_KNOBS`, :data:`NODE_KNOBS`).
        fp8: whether the weights were already stored in fp8 (then fp8 is not suggested again).
    Returns:
        one line: ``"FantasyPortrait ran out of GPU memory (<tried>): set ..., or lower ..."``.
    """
    first = "" if fp8 else f"{knobs.fp8} (halves the transformer weights) and/or "
    return (f"FantasyPortrait ran out of GPU memory ({tried}): set {first}{knobs.offload} (weights stay in CPU "
            f"RAM), or lower {knobs.size}, {knobs.length} or {knobs.context}, or use a larger GPU")


"""FantasyPortrait on ComfyUI's own Wan2.1 I2V MODEL (native loaders, GGUF, LoRA, samplers, memory
management).

Three nodes:

* **FantasyPortrait Adapter Loader** → ``FANTASYPORTRAIT_ADAPTER``: the adapter alone
  (``fantasyportrait_core.weights.load.load_adapter``).
* **FantasyPortrait Patch Model** (MODEL + adapter + FP_PORTRAIT → MODEL): a clone of the MODEL
  whose every block's cross-attention adds the portrait term before its output projection, as the
  reference ``SingleStreamBlockProcessor`` does (FantasyPortrait §3.2–3.3). The term is
  :func:`fantasyportrait_core.model.attention.apply_portrait`, the one implementation our own sampler
  and the CLI call too. ComfyUI's cross-attention itself runs unchanged (no copy of it here): its
  attention backend and flags (sage attention, ``low_precision_attention``, the per-layer
  ``comfy_attention`` of quantized checkpoints), LoRA weight patches, GGUF dequantisation and fp8
  casting apply exactly as in an unpatched MODEL.
* **FantasyPortrait Guider** (→ GUIDER for SamplerCustomAdvanced): dual guidance, the 1–3 passes of
  :func:`fantasyportrait_core.sampling.guidance.guidance_passes` combined by
  :func:`~fantasyportrait_core.sampling.guidance.combine_guidance` exactly as our sampler does. With a plain
  KSampler (or any other guider) the portrait branch is on in every pass.

How it hooks into ComfyUI (``comfy/ldm/wan/model.py``; chosen by feature detection, see
docs/COMPATIBILITY.md):

* The patch is a ``DIFFUSION_MODEL`` wrapper on the clone's ModelPatcher (ComfyUI's wrapper API,
  ``comfy.patcher_extension``). For the duration of each forward of *that* clone it puts two
  PyTorch hooks on every block's own cross-attention modules (:class:`PortraitHooks`: keep the
  query after ``norm_q``, add the portrait term to the input of ``o``) and removes them afterwards,
  so the shared weights are never left patched: another MODEL from the same loader (or the same
  MODEL sampled without the patch) never sees them, whatever ComfyUI's clone/unload order. Core's
  ``attn2_patch`` (after the block's cross-attention residual) does not fit: it sees neither the
  query nor the output before ``o``. What the hooks need is checked at patch time
  (:func:`check_wan_i2v`) and in every forward (each block added its term once).
* The latent grid (frames, height, width in tokens) is read from ``x`` in that wrapper; the
  per-person latent maps are built for it with :func:`nodes.sampler.portrait_layout` /
  ``drive.condition.portrait_condition``, the code our sampler uses, and cached for the sampling run.
  Under ComfyUI's context windows (WAN Context Windows (Manual); ``transformer_options
  ["context_window"]``) each window gets the expression windows and person map of its own latent
  frames (:func:`window_frames`: ``index_list``, with newer ComfyUI's causal anchor frame in front),
  and an ``APPLY_MODEL`` wrapper (:func:`window_image_condition`) gives it the same frames of the
  I2V image condition where ComfyUI has not windowed it (0.3.64 leaves it whole; newer ComfyUI
  windows it itself, and it is then left alone).
* The adapter's weights are two ComfyUI ModelPatchers (the expression-token path, kept fp32 as in
  the reference, and the per-block K/V projections in the MODEL's compute dtype) attached to the
  clone as additional models: ComfyUI loads them to the GPU together with the MODEL before
  sampling, may leave parts of them on the CPU when VRAM is short (their layers are ComfyUI cast
  ops, streamed per call) and offloads them like any other model.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field

import torch

from fantasyportrait_core.runtime.job import widget_range
from fantasyportrait_core.drive.condition import portrait_condition
from fantasyportrait_core.drive.encode import frames_for
from fantasyportrait_core.model.geometry import TOKEN_STRIDE, latent_frames, pixel_frames
from fantasyportrait_core.model.attention import PortraitCondition, apply_portrait
from fantasyportrait_core.weights.load import check_flash_dit, load_adapter
from fantasyportrait_core.sampling.guidance import combine_guidance, guidance_passes

from . import host
from .sampler import portrait_layout

log = logging.getLogger("FantasyPortrait")

CATEGORY = "FantasyPortrait/native"
PATCH_KEY = "fantasyportrait"  # wrapper / callback / additional-model key on the ModelPatcher
PASSES_KEY = "fantasyportrait_passes"  # transformer_options: with-portrait flag per cond index (guider)
ADAPTER_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NEEDS_COMFY = ("the FantasyPortrait native nodes patch ComfyUI's own Wan MODEL and run only inside ComfyUI; "
               "outside it use FantasyPortrait Model Loader + FantasyPortrait Sampler")


def _comfy_modules():
    try:
        import comfy.model_management as mm
        import comfy.model_patcher as mp
        import comfy.ops as ops
        import comfy.patcher_extension as pe
    except ImportError as e:
        raise RuntimeError(NEEDS_COMFY) from e
    return mm, mp, ops, pe


# ----------------------------------------------------------------------------------------------
# Adapter under ComfyUI's model management


def make_castable(module: torch.nn.Module) -> torch.nn.Module:
    """Turn every ``nn.Linear`` / ``nn.LayerNorm`` of ``module`` into ComfyUI's cast ops, in place.

    They compute exactly as before; the difference is that ComfyUI's partial loading (lowvram) may
    leave them on the offload device and cast their weights to the input's device and dtype per call
    (``comfy.ops.disable_weight_init``), as it does for the Wan model's own layers.
    """
    _, _, ops, _ = _comfy_modules()
    table = {torch.nn.Linear: ops.disable_weight_init.Linear, torch.nn.LayerNorm: ops.disable_weight_init.LayerNorm}
    for m in module.modules():
        if type(m) in table:
            m.__class__ = table[type(m)]
    return module


class _TokenPath(torch.nn.Module):
    """The adapter's expression-token modules (shared, not copied) as one model for a ModelPatcher."""

    def __init__(self, adapter):
        super().__init__()
        self.proj_model = adapter.proj_model
        self.mouth_proj_model = adapter.mouth_proj_model
        self.emo_proj_model = adapter.emo_proj_model


def _patcher(module: torch.nn.Module):
    mm, mp, _, _ = _comfy_modules()
    return mp.ModelPatcher(make_castable(module), load_device=mm.get_torch_device(),
                           offload_device=mm.unet_offload_device())


def _kv_dtype(blocks) -> torch.dtype:
    return blocks.blocks[0].cross_attn.ip_adapter_single_stream_k_proj.weight.dtype


@dataclass(eq=False)
class NativeAdapter:
    """FANTASYPORTRAIT_ADAPTER: the portrait adapter and the ComfyUI ModelPatchers holding its weights.

    Attributes:
        adapter: :class:`~fantasyportrait_core.model.adapter.PortraitAdapter` (on the offload device).
        path: the file it came from (re-read once if a MODEL computes in another dtype).
    """

    adapter: torch.nn.Module
    path: str
    kv_from: str | None = None  # FlashPortrait: the transformer file holding emo_{k,v}_proj (if not in ``path``)
    _tokens: object = field(default=None, repr=False)
    _kv: dict = field(default_factory=dict, repr=False)  # dtype -> (ModelPatcher, ip_adapter blocks)

    def token_patcher(self):
        """ModelPatcher of the expression-token path (projection + resamplers, fp32)."""
        if self._tokens is None:
            self._tokens = _patcher(_TokenPath(self.adapter))
        return self._tokens

    def kv_for(self, dtype: torch.dtype | None):
        """``(ModelPatcher, blocks)`` of the per-block K/V projections in ``dtype`` (``None``: as
        loaded). Another dtype than the loaded one is read from the file once and kept."""
        loaded = _kv_dtype(self.adapter.ip_adapter)
        dtype = dtype or loaded
        if dtype not in self._kv:
            if dtype == loaded:
                blocks = self.adapter.ip_adapter
            else:
                log.info("[FantasyPortrait] adapter K/V %s -> %s to follow the MODEL's compute dtype", loaded, dtype)
                blocks = load_adapter(self.path, dtype=dtype, device=host.offload_device(), kv_from=self.kv_from).ip_adapter
            self._kv[dtype] = (_patcher(blocks), blocks)
        return self._kv[dtype]


def default_adapter_dtype() -> torch.dtype:
    """The dtype ComfyUI computes a Wan model in on this device: bf16 where supported, else fp16 on
    a GPU, else fp32 (so the K/V projections normally need no conversion at patch time)."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    device = mm.get_torch_device()
    if mm.should_use_bf16(device):
        return torch.bfloat16
    if mm.should_use_fp16(device):
        return torch.float16
    return torch.float32


def compute_dtype(model) -> torch.dtype | None:
    """The dtype a ComfyUI MODEL computes in (``manual_cast_dtype`` for fp8 / GGUF storage, else its
    weight dtype); ``None`` when that is not a float type the adapter can take."""
    base = model.model
    dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else None


class FantasyPortraitAdapterLoader:
    """The FantasyPortrait adapter alone, for the patch on ComfyUI's own Wan MODEL."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "adapter": (host.list_models(host.MODEL_FOLDER), {
                "tooltip": "fantasyportrait_model.ckpt or Wan2_1_FantasyPortrait_fp16.safetensors from "
                           "models/fantasyportrait."}),
            "weight_dtype": (list(ADAPTER_DTYPES), {
                "default": "auto",
                "tooltip": "dtype of the per-block K/V projections (1.7 GB in bf16 for 14B). auto: the dtype "
                           "ComfyUI computes Wan in on this device. At patch time they follow the MODEL's "
                           "compute dtype anyway; the expression-token path stays fp32 (reference)."}),
        }, "optional": {
            "flashportrait_transformer": (["none"] + host.transformer_list(), {
                "default": "none",
                "tooltip": "FlashPortrait only, with its portrait_encoder.pt as the adapter: FlashPortrait's "
                           "transformer.pt (the same file Load Diffusion Model loads), from which only the per-block "
                           "emo_k_proj / emo_v_proj are read. none: FantasyPortrait, or FlashPortrait's single-file "
                           "repack as the adapter."}),
        }}

    RETURN_TYPES = ("FANTASYPORTRAIT_ADAPTER",)
    RETURN_NAMES = ("adapter",)
    OUTPUT_TOOLTIPS = ("The FantasyPortrait adapter (expression-token path + per-block K/V projections) for "
                       "FantasyPortrait Patch Model.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads the FantasyPortrait adapter for FantasyPortrait Patch Model (Wan2.1 I2V loaded with the "
                   "native Load Diffusion Model or a GGUF loader). ComfyUI loads and offloads its weights "
                   "together with the MODEL.")

    def load(self, adapter, weight_dtype="auto", flashportrait_transformer="none"):
        if weight_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"weight_dtype '{weight_dtype}' is not one of {list(ADAPTER_DTYPES)}")
        path = host.model_path(host.MODEL_FOLDER, adapter)
        dtype = ADAPTER_DTYPES[weight_dtype] or default_adapter_dtype()
        kv_from = None if flashportrait_transformer in (None, "", "none") else host.transformer_path(flashportrait_transformer)
        loaded = load_adapter(path, dtype=dtype, device=host.offload_device(), kv_from=kv_from)
        if kv_from is not None and loaded.family != "flashportrait":
            raise ValueError(f"flashportrait_transformer is set but {adapter} is a FantasyPortrait adapter: set it to "
                             f"none, or choose FlashPortrait's portrait_encoder.pt as the adapter")
        return (NativeAdapter(loaded, path, kv_from),)


# ----------------------------------------------------------------------------------------------
# The patched cross-attention


class PortraitHooks:
    """The portrait term on the blocks' own cross-attention modules, for one forward.

    ComfyUI's Wan cross-attention runs as ComfyUI wrote it (its attention backend, sage / low
    precision flags, per-layer ``comfy_attention``, fp8 / GGUF / LoRA casting of its layers). Two
    PyTorch module hooks on each block's ``cross_attn`` add what FantasyPortrait adds there
    (reference ``SingleStreamBlockProcessor``, FantasyPortrait §3.2-3.3): a forward hook on
    ``norm_q`` keeps the normalised query the block computed, a forward pre-hook on ``o`` adds
    :func:`add_portrait` (``apply_portrait(q)`` on the portrait rows) to the attention output
    before the output projection. The hooks exist only inside :meth:`attach` (the forward of the
    patched clone); another MODEL sharing the weights never sees them.

    Args:
        blocks: the Wan model's ``blocks``.
        kv: ``block index -> (k_proj, v_proj)`` of the adapter.
        state: ``(PortraitCondition, rows)`` of this forward (see :func:`add_portrait`).
        tokens: video tokens of this forward (``F · h · w`` of the latent grid).
        normalize: FlashPortrait family: the term is rescaled to the block's text + image output (the
            input of ``o``), :func:`~fantasyportrait_core.model.attention.normalize_expression`.
    """

    def __init__(self, blocks, kv, state, tokens: int, normalize: bool = False):
        self.blocks, self.kv, self.state, self.tokens, self.normalize = blocks, kv, state, tokens, normalize
        self.q: dict[int, torch.Tensor] = {}
        self.calls = [[0, 0] for _ in blocks]  # per block: norm_q outputs kept, portrait terms added

    def _keep_q(self, i, module, args, output):
        self.q[i] = output
        self.calls[i][0] += 1

    def _add(self, i, module, args):
        q = self.q.pop(i, None)
        out = args[0]
        if q is None or q.shape[:2] != out.shape[:2]:
            raise RuntimeError(missing_hook_message(self.blocks[i].cross_attn, "its output projection o ran without its "
                                                    "query norm norm_q just before"))
        if q.shape[1] != self.tokens:
            raise ValueError(f"FantasyPortrait: block {i} attends over {q.shape[1]} video tokens but the latent grid has "
                             f"{self.tokens}; another patch or input adds tokens the portrait condition does not cover")
        self.calls[i][1] += 1
        ca = self.blocks[i].cross_attn
        return (add_portrait(out, q, self.state, ca.num_heads, *self.kv(i), normalize=self.normalize),) + tuple(args[1:])

    @contextlib.contextmanager
    def attach(self):
        """Hooks on for the block, off afterwards (also after an exception); checks that every
        block added its portrait term exactly once per query (else the forward raises rather than
        return a result without the portrait)."""
        handles = []
        try:
            for i, b in enumerate(self.blocks):
                handles.append(b.cross_attn.norm_q.register_forward_hook(functools.partial(self._keep_q, i)))
                handles.append(b.cross_attn.o.register_forward_pre_hook(functools.partial(self._add, i)))
            yield self
        finally:
            for h in handles:
                h.remove()
            self.q.clear()
        for i, (kept, added) in enumerate(self.calls):
            if kept == 0 or kept != added:
                raise RuntimeError(missing_hook_message(self.blocks[i].cross_attn,
                                                        f"norm_q ran {kept}x and o {added}x in one forward"))


def missing_hook_message(attn, what: str) -> str:
    """The one line naming the cross-attention class and what the portrait hooks miss in it."""
    return (f"FantasyPortrait cannot attach to {type(attn).__module__}.{type(attn).__name__} of this ComfyUI: {what} "
            f"(the portrait term needs the query after norm_q and goes before o); use FantasyPortrait Model Loader + "
            f"Sampler, or report the ComfyUI version")


def add_portrait(out: torch.Tensor, q: torch.Tensor, state, heads: int, k_proj, v_proj,
                 normalize: bool = False) -> torch.Tensor:
    """``out + apply_portrait(q)`` on the batch rows of ``state = (condition, rows)``.

    Args:
        out, q: ``[B, L, H·D]`` attention output (text + image, the input of ``o``) and normalised query.
        rows: long ``[R]`` batch rows that get the portrait term, or ``None`` for all.
        normalize: FlashPortrait: rescale the term to ``out``'s statistics (``base=`` of ``apply_portrait``).
    """
    cond, rows = state
    b, length, width = q.shape
    if rows is None:
        term = apply_portrait(q.view(b, length, heads, width // heads), cond, k_proj, v_proj,
                              base=out if normalize else None)
        return out if term is None else out + term
    term = apply_portrait(q[rows].view(len(rows), length, heads, width // heads), cond, k_proj, v_proj,
                          base=out[rows] if normalize else None)
    return out if term is None else out.index_add(0, rows, term.to(out.dtype))


def portrait_rows(batch: int, transformer_options: dict) -> torch.Tensor | None | bool:
    """Which rows of a batched forward get the portrait term.

    ComfyUI batches the passes of one step (``transformer_options["cond_or_uncond"]``: the cond
    index of each equal chunk of the batch). The FantasyPortrait Guider sets
    ``transformer_options[PASSES_KEY]``: per cond index, whether that pass has the portrait.

    Returns:
        ``None`` (every row: no guider flags, e.g. KSampler), ``False`` (no row), or long ``[R]``.
    """
    flags = transformer_options.get(PASSES_KEY)
    if flags is None:
        return None
    order = transformer_options.get("cond_or_uncond") or list(range(len(flags)))
    chunk = batch // len(order)
    on = [j for j, c in enumerate(order) if flags[c]]
    if not on:
        return False
    if len(on) == len(order):
        return None
    return torch.tensor([j * chunk + r for j in on for r in range(chunk)], dtype=torch.long)


class NativePortrait:
    """The ``DIFFUSION_MODEL`` wrapper of a patched MODEL: what its cross-attention adds, per forward.

    Args:
        portrait: FP_PORTRAIT (:class:`nodes.portrait.PortraitInputs`).
        adapter: the PortraitAdapter (its expression-token path makes the tokens).
        kv_blocks: the adapter's ``ip_adapter`` blocks in the MODEL's compute dtype.
    """

    def __init__(self, portrait, adapter, kv_blocks):
        self.portrait, self.adapter, self.kv_blocks = portrait, adapter, kv_blocks
        self.available = frames_for(portrait.drivers)  # pixel frames (4k+1) every driver covers
        self._cond: tuple | None = None  # (key, PortraitCondition) of the current sampling run
        self._windows: dict = {}  # context-window frames -> PortraitCondition

    def kv_projections(self, block: int):
        ca = self.kv_blocks.blocks[block].cross_attn
        return ca.ip_adapter_single_stream_k_proj, ca.ip_adapter_single_stream_v_proj

    def clear(self, *_):
        """Drop the cached condition (device tensors); called when a sampling run ends."""
        self._cond, self._windows = None, {}

    def condition(self, grid: tuple[int, int, int], frames: list[int] | None, device) -> PortraitCondition:
        """The :class:`PortraitCondition` of one forward.

        Args:
            grid: ``(F, h, w)`` latent frames and token rows / columns of this forward.
            frames: latent frame indices of a context window (``None``: frames ``0..F-1``).
        Raises:
            ValueError: when the latent is longer than every driving expression covers.
        """
        f_lat, h, w = grid
        last = (max(frames) if frames else f_lat - 1) + 1
        if last > latent_frames(self.available):
            need = pixel_frames(last)
            raise ValueError(f"the latent is {need} frames long but a driving expression has only "
                             f"{min(d.num_frames for d in self.portrait.drivers)}; set WanImageToVideo length to at "
                             f"most {self.available}")
        # one condition per run: for the whole available length under context windows (windows
        # come in any order), else for this latent's length
        num_frames = self.available if frames is not None else pixel_frames(f_lat)
        dtype = self.kv_projections(0)[0].weight.dtype
        key = (w * TOKEN_STRIDE, h * TOKEN_STRIDE, num_frames, device, dtype)
        if self._cond is None or self._cond[0] != key:
            layout = portrait_layout(self.portrait, w * TOKEN_STRIDE, h * TOKEN_STRIDE, num_frames)
            with torch.no_grad():
                c = portrait_condition(self.adapter, self.portrait.drivers, num_frames, layout, self.portrait.scale)
            moved = PortraitCondition(
                c.windows.to(device=device, dtype=dtype),
                None if c.token_person is None else c.token_person.to(device),
                None if c.latent_person is None else c.latent_person.to(device), c.scale)
            self._cond, self._windows = (key, moved), {}
        cond = self._cond[1]
        if frames is None:
            return cond if cond.windows.shape[1] == f_lat else cond.select_frames(range(f_lat))
        k = tuple(frames)
        if k not in self._windows:
            self._windows[k] = cond.select_frames(frames)
        return self._windows[k]

    def __call__(self, executor, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={},
                 **kwargs):
        """``DIFFUSION_MODEL`` wrapper around ``WanModel._forward`` (``x [B, 36, F, H/8, W/8]``)."""
        rows = portrait_rows(x.shape[0], transformer_options)
        if rows is False or self.portrait.scale == 0.0:
            return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)
        extra = [name for name, value in (("time_dim_concat", time_dim_concat),
                                           *((k, kwargs.get(k)) for k in EXTRA_FRAME_INPUTS)) if value is not None]
        if extra:
            raise ValueError(f"FantasyPortrait patches Wan2.1 I2V; this MODEL got inputs that add frames or tokens to the "
                             f"video ({', '.join(extra)}), which the portrait condition does not cover: remove the node "
                             f"that sets them or sample without FantasyPortrait Patch Model")
        f_lat, lat_h, lat_w = x.shape[2:]
        if lat_h % 2 or lat_w % 2:
            raise ValueError(f"width and height must be multiples of 16 for FantasyPortrait, got {lat_w * 8}x{lat_h * 8}")
        frames = window_frames(transformer_options.get("context_window"), f_lat)
        cond = self.condition((f_lat, lat_h // 2, lat_w // 2), frames, x.device)
        blocks = executor.class_obj.blocks
        if len(blocks) != self.adapter.num_layers:
            raise ValueError(f"the adapter has {self.adapter.num_layers} blocks, this MODEL {len(blocks)}")
        hooks = PortraitHooks(blocks, self.kv_projections, (cond, None if rows is None else rows.to(x.device)),
                              f_lat * (lat_h // 2) * (lat_w // 2),
                              normalize=getattr(self.adapter, "normalize_expression", False))
        with hooks.attach():
            return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)


# WanModel.forward keyword inputs that lengthen the token sequence beyond the video latent's grid
# (ComfyUI: reference_latent for Wan2.1 Fun / VACE-like refs, context_latents for in-context
# references); checked by name, and every forward also checks the query length in the hooks.
EXTRA_FRAME_INPUTS = ("reference_latent", "context_latents")


def window_frames(window, f_lat: int) -> list[int] | None:
    """The latent frames a context window's forward sees, in order: ComfyUI's ``index_list``, with
    the causal anchor frame in front where newer ComfyUI adds one (``causal_window_fix``:
    ``causal_anchor_index >= 0``, which ``index_list`` does not list). ``None`` without a window.

    Raises:
        ValueError: when that count differs from the latent's ``f_lat`` frames (a window scheme this
            patch does not know; never a condition for other frames).
    """
    if window is None or not hasattr(window, "index_list"):
        return None
    frames = [int(i) for i in window.index_list]
    anchor = getattr(window, "causal_anchor_index", None)
    if anchor is not None and anchor >= 0:
        frames = [int(anchor)] + frames
    if len(frames) != f_lat:
        raise ValueError(f"this context window lists {len(frames)} latent frames {frames[:3]}... but its latent has "
                         f"{f_lat}; FantasyPortrait cannot tell which frames' expressions to use: update the pack or "
                         f"use FantasyPortrait Sampler's long_video windows")
    return frames


def window_image_condition(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                           **kwargs):
    """``APPLY_MODEL`` wrapper: under ComfyUI's context windows, give each window its frames of the I2V
    image condition (``c_concat [B, 20, T, H/8, W/8]``: 4 mask + 16 reference-latent channels per
    latent frame), exactly the frames of :func:`window_frames` (anchor included).

    ComfyUI 0.3.64's context handler windows ``x`` along the frames (``dim=2`` for Wan) but not the
    5-D ``c_concat``, so Wan2.1 I2V fails there with a size mismatch; newer ComfyUI windows it
    itself (``slice_cond``), and then it arrives with the window's length and is left as it is
    (never windowed twice). Cutting it is what our sampler's context windows do
    (``context.slice_conditioning``): the window holding latent frame 0 sees the reference image,
    the others see its empty frames.
    """
    window = transformer_options.get("context_window")
    if window is not None and c_concat is not None and c_concat.ndim == 5 and c_concat.shape[2] != x.shape[2]:
        frames = window_frames(window, x.shape[2])
        if frames is not None:
            if max(frames) >= c_concat.shape[2]:
                raise ValueError(f"the I2V image condition has {c_concat.shape[2]} latent frames but the context window "
                                 f"needs frame {max(frames)}; give WanImageToVideo the same length as the latent")
            c_concat = c_concat[:, :, torch.as_tensor(frames, device=c_concat.device)]
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


# what the portrait hooks use on every block's cross-attention (feature detection, no version check)
CROSS_ATTENTION_PARTS = ("q", "norm_q", "o", "k_img", "v_img")


# what the hooks use on a Wan2.2-I2V-A14B expert (ComfyUI's t2v_cross_attn: no image branch)
EXPERT_CROSS_ATTENTION_PARTS = ("q", "norm_q", "o")


def is_wan22_i2v_expert(diffusion_model) -> bool:
    """Whether a ComfyUI ``WanModel`` is one Wan2.2-I2V-A14B expert: ComfyUI's model detection
    (``comfy/model_detection.py``, read at 0.3.64 a125cd84 and at a9fc7512) types a Wan checkpoint
    without ``img_emb`` as ``model_type "t2v"`` (supported model ``WAN21_T2V``, ``t2v_cross_attn``);
    the I2V experts are told apart from T2V by their 36 input channels (16 noise + 4 mask + 16 image
    latent)."""
    if type(diffusion_model).__name__ != "WanModel" or getattr(diffusion_model, "model_type", None) != "t2v":
        return False
    in_dim = getattr(diffusion_model, "in_dim", None)
    if in_dim is None:
        pe = getattr(diffusion_model, "patch_embedding", None)
        in_dim = getattr(getattr(pe, "weight", None), "shape", (None, None))[1]
    return in_dim == 36


def check_wan_i2v(diffusion_model, adapter):
    """Raise ``ValueError`` (one line naming the model class and what is missing) unless
    ``diffusion_model`` is ComfyUI's Wan2.1 I2V ``WanModel`` (CLIP image cross-attention) or one
    Wan2.2-I2V-A14B expert (:func:`is_wan22_i2v_expert`; experimental: the adapter was trained on
    Wan2.1) whose blocks' cross-attention has the modules :class:`PortraitHooks` attaches to and whose
    width and block count match the adapter's. Subclasses (VACE, camera, S2V, HuMo, Animate, ...) are
    refused: they add frames or tokens the portrait condition does not cover.

    Returns:
        ``"Wan2.1-I2V"`` or ``"Wan2.2-I2V-A14B expert"``.
    """
    name = type(diffusion_model).__name__
    blocks = getattr(diffusion_model, "blocks", None)
    expert = is_wan22_i2v_expert(diffusion_model)
    if (not expert and (name != "WanModel" or getattr(diffusion_model, "model_type", None) != "i2v")) or not blocks:
        raise ValueError(f"model must be Wan2.1 image-to-video 14B (e.g. wan2.1_i2v_720p_14B_*.safetensors or a GGUF of "
                         f"it in Load Diffusion Model / Unet Loader (GGUF)) or a Wan2.2-I2V-A14B expert "
                         f"(wan2.2_i2v_high_noise / low_noise, experimental); got {name} "
                         f"{getattr(diffusion_model, 'model_type', '')}")
    attn = getattr(blocks[0], "cross_attn", None)
    parts = EXPERT_CROSS_ATTENTION_PARTS if expert else CROSS_ATTENTION_PARTS
    missing = [p for p in parts if not isinstance(getattr(attn, p, None), torch.nn.Module)]
    if not isinstance(getattr(attn, "num_heads", None), int):
        missing.append("num_heads")
    if missing:
        raise ValueError(f"{name}'s cross-attention {type(attn).__name__} has no {', '.join(missing)}: it is not Wan2.1 "
                         f"I2V with CLIP image attention nor a Wan2.2-I2V expert (FLF has no FantasyPortrait adapter), or "
                         f"this ComfyUI changed it; use FantasyPortrait Model Loader + Sampler")
    if adapter.num_layers != len(blocks) or adapter.dim != diffusion_model.dim:
        raise ValueError(f"the FantasyPortrait adapter fits a {adapter.num_layers}-block, {adapter.dim}-wide Wan; the "
                         f"model has {len(blocks)} blocks of width {diffusion_model.dim}: use Wan2.1 I2V 14B or "
                         f"Wan2.2-I2V-A14B")
    if expert:
        log.warning("[FantasyPortrait] Patch Model on a Wan2.2-I2V-A14B expert: experimental (the adapter was trained on "
                    "Wan2.1; its quality on Wan2.2 has not been measured)")
    return "Wan2.2-I2V-A14B expert" if expert else "Wan2.1-I2V"


class FantasyPortraitPatchModel:
    """ComfyUI's own Wan2.1 I2V MODEL + adapter + portrait conditioning -> MODEL with the portrait branch."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "Wan2.1 I2V 14B from Load Diffusion Model (bf16 / fp8) or a GGUF loader, "
                                           "with any LoRAs (LoraLoaderModelOnly) before or after this node. "
                                           "Wan2.2-I2V-A14B (experimental: the adapter was trained on Wan2.1, quality "
                                           "on Wan2.2 not measured): patch the high-noise and the low-noise expert "
                                           "MODEL each with its own Patch Model."}),
            "adapter": ("FANTASYPORTRAIT_ADAPTER", {"tooltip": "From FantasyPortrait Adapter Loader."}),
            "portrait": ("FP_PORTRAIT", {"tooltip": "From FantasyPortrait Conditioning (faces, expressions, "
                                                    "portrait_scale)."}),
        }}

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same Wan2.1 I2V MODEL with the portrait branch in every block's cross-attention; "
                       "sample it with FantasyPortrait Guider (or KSampler: portrait always on).",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Adds the FantasyPortrait expression branch to every cross-attention of a native Wan2.1 I2V MODEL. "
                   "Sample with FantasyPortrait Guider + SamplerCustomAdvanced (dual guidance) or with KSampler "
                   "(portrait always on).")

    def patch(self, model, adapter, portrait):
        _, _, _, pe = _comfy_modules()
        if not isinstance(adapter, NativeAdapter):
            raise ValueError("adapter must come from FantasyPortrait Adapter Loader")
        if not hasattr(portrait, "drivers") or not portrait.drivers:
            raise ValueError("portrait must come from FantasyPortrait Conditioning")
        check_wan_i2v(model.get_model_object("diffusion_model"), adapter.adapter)
        attn0 = model.get_model_object("diffusion_model").blocks[0].cross_attn
        check_flash_dit(getattr(attn0.o, "bias", None), adapter.adapter, "model")
        kv_patcher, kv_blocks = adapter.kv_for(compute_dtype(model))
        runtime = NativePortrait(portrait, adapter.adapter, kv_blocks)
        patched = model.clone()
        patched.remove_wrappers_with_key(pe.WrappersMP.DIFFUSION_MODEL, PATCH_KEY)  # a second patch replaces the first
        patched.remove_wrappers_with_key(pe.WrappersMP.APPLY_MODEL, PATCH_KEY)
        patched.remove_callbacks_with_key(pe.CallbacksMP.ON_CLEANUP, PATCH_KEY)
        patched.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, PATCH_KEY, runtime)
        patched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, PATCH_KEY, window_image_condition)
        patched.add_callback_with_key(pe.CallbacksMP.ON_CLEANUP, PATCH_KEY, runtime.clear)
        patched.set_additional_models(PATCH_KEY, [adapter.token_patcher(), kv_patcher])
        return (patched,)


def is_patched(model) -> bool:
    """Whether a ComfyUI MODEL carries the FantasyPortrait patch."""
    wrappers = getattr(model, "wrappers", {}) or {}
    return bool(wrappers.get("diffusion_model", {}).get(PATCH_KEY))


# ----------------------------------------------------------------------------------------------
# Dual guidance for SamplerCustomAdvanced


@functools.lru_cache(maxsize=None)
def guider_class():
    """``comfy.samplers.CFGGuider`` subclass with FantasyPortrait's dual guidance (built on first use:
    ComfyUI is imported only inside ComfyUI)."""
    import comfy.samplers

    class PortraitGuider(comfy.samplers.CFGGuider):
        """Runs the passes of :func:`guidance_passes` in one ``calc_cond_batch`` (batched when memory
        allows, through ComfyUI's context windows when set) and combines their x0 predictions with
        :func:`combine_guidance`. The combination is affine with weights summing to 1, so on x0 it
        equals our sampler's combination of velocities (``x0 = x − σ·v``)."""

        def set_cfg(self, cfg, portrait_cfg=1.0):
            self.cfg, self.portrait_cfg = float(cfg), float(portrait_cfg)

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            passes = guidance_passes(self.cfg, self.portrait_cfg)
            conds = [self.conds.get(prompt) for prompt, _ in passes]
            options = dict(model_options)
            options["transformer_options"] = dict(model_options.get("transformer_options", {}))
            options["transformer_options"][PASSES_KEY] = [with_portrait for _, with_portrait in passes]
            out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, options)
            pred = dict(zip(passes, out))
            return combine_guidance(pred[("positive", True)], pred.get(("positive", False)),
                                    pred.get(("negative", False), pred.get(("negative", True))),
                                    self.cfg, self.portrait_cfg)

    return PortraitGuider


class FantasyPortraitGuider:
    """GUIDER with FantasyPortrait's dual guidance (text cfg and portrait cfg) for SamplerCustomAdvanced."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "From FantasyPortrait Patch Model."}),
            "positive": ("CONDITIONING", {"tooltip": "From WanImageToVideo."}),
            "negative": ("CONDITIONING", {"tooltip": "From WanImageToVideo; used only when cfg != 1."}),
            "cfg": ("FLOAT", {"default": 1.0, **widget_range("cfg"), "step": 0.1,
                              "tooltip": "Text guidance; 1 = off (the reference setting, saves a pass; also use 1 "
                                         "with the lightx2v step-distill LoRA)."}),
            "portrait_cfg": ("FLOAT", {"default": 4.0, **widget_range("portrait_cfg"), "step": 0.1,
                                       "tooltip": "Portrait guidance; 1 or less = off (as the reference). The reference "
                                                  "uses 4."}),
        }}

    RETURN_TYPES = ("GUIDER",)
    RETURN_NAMES = ("guider",)
    OUTPUT_TOOLTIPS = ("Dual-guidance GUIDER (cfg, portrait cfg) for SamplerCustomAdvanced.",)
    FUNCTION = "get_guider"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Each step runs 1-3 passes (positive with portrait; positive without; negative) and combines them "
                   "as pred = neg + cfg·(pos − neg) + portrait_cfg·(pos_portrait − pos), as FantasyPortrait Sampler "
                   "does. Feed SamplerCustomAdvanced.")

    def get_guider(self, model, positive, negative, cfg=1.0, portrait_cfg=4.0):
        _comfy_modules()
        if not is_patched(model):
            raise ValueError("model has no FantasyPortrait branch: connect it through FantasyPortrait Patch Model")
        if cfg < 1.0 or portrait_cfg < 0.0:
            raise ValueError(f"cfg must be >= 1 and portrait_cfg >= 0, got cfg={cfg}, portrait_cfg={portrait_cfg}")
        guider = guider_class()(model)
        guider.inner_set_conds({"positive": positive, "negative": negative})
        guider.set_cfg(cfg, portrait_cfg)
        return (guider,)

"""FantasyPortrait on ComfyUI's own Wan2.1 I2V MODEL (native loaders, GGUF, LoRA, samplers, memory
management).

Three nodes:

* **FantasyPortrait Adapter Loader** → ``FANTASYPORTRAIT_ADAPTER``: the adapter alone
  (``fantasyportrait_core.checkpoints.load_adapter``).
* **FantasyPortrait Patch Model** (MODEL + adapter + FP_PORTRAIT → MODEL): a clone of the MODEL
  whose every block's cross-attention adds the portrait term before its output projection, as the
  reference ``SingleStreamBlockProcessor`` does (FantasyPortrait §3.2–3.3). The term is
  :func:`fantasyportrait_core.attention.apply_portrait`, the one implementation our own sampler
  and the CLI call too; the patched attention reuses the block's own ``q``/``norm_q``/``k``/``v``/
  ``k_img``/``v_img``/``norm_k``/``norm_k_img``/``o`` modules, so LoRA weight patches, GGUF
  dequantisation and fp8 casting apply to them as usual.
* **FantasyPortrait Guider** (→ GUIDER for SamplerCustomAdvanced): dual guidance, the 1–3 passes of
  :func:`fantasyportrait_core.sampling.guidance_passes` combined by
  :func:`~fantasyportrait_core.sampling.combine_guidance` exactly as our sampler does. With a plain
  KSampler (or any other guider) the portrait branch is on in every pass.

How it hooks into ComfyUI (0.3.6x, ``comfy/ldm/wan/model.py``):

* The patch is a ``DIFFUSION_MODEL`` wrapper on the clone's ModelPatcher. For the duration of each
  forward of *that* clone it sets every block's ``cross_attn.forward`` to
  :func:`portrait_cross_attention` and restores the previous one afterwards, so the shared weights
  are never left patched: another MODEL from the same loader (or the same MODEL sampled without
  the patch) never sees it, whatever ComfyUI's clone/unload order. (Object patches, the other
  option, stay set on the shared model after sampling until another clone loads.)
* The latent grid (frames, height, width in tokens) is read from ``x`` in that wrapper; the
  per-person latent maps are built for it with :func:`nodes.sampler.portrait_layout` /
  ``pipeline.portrait_condition``, the code our sampler uses, and cached for the sampling run.
  Under ComfyUI's context windows (WAN Context Windows (Manual); ``transformer_options
  ["context_window"]``) each window gets the expression windows and person map of its own latent
  frames, and an ``APPLY_MODEL`` wrapper (:func:`window_image_condition`) gives it its frames of
  the I2V image condition, which ComfyUI 0.3.64 leaves unwindowed (plain Wan2.1 I2V fails there).
* The adapter's weights are two ComfyUI ModelPatchers (the expression-token path, kept fp32 as in
  the reference, and the per-block K/V projections in the MODEL's compute dtype) attached to the
  clone as additional models: ComfyUI loads them to the GPU together with the MODEL before
  sampling, may leave parts of them on the CPU when VRAM is short (their layers are ComfyUI cast
  ops, streamed per call) and offloads them like any other model.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field

import torch

from fantasyportrait_core import pipeline as P
from fantasyportrait_core.adapter import latent_frames
from fantasyportrait_core.attention import PortraitCondition, apply_portrait
from fantasyportrait_core.checkpoints import load_adapter
from fantasyportrait_core.masks import TOKEN_STRIDE
from fantasyportrait_core.sampling import combine_guidance, guidance_passes

from . import host
from .sampler import portrait_layout

log = logging.getLogger("FantasyPortrait")

CATEGORY = "FantasyPortrait/native"
PATCH_KEY = "fantasyportrait"  # wrapper / callback / additional-model key on the ModelPatcher
PASSES_KEY = "fantasyportrait_passes"  # transformer_options: with-portrait flag per cond index (guider)
STATE_KEY = "fantasyportrait_state"  # transformer_options: this forward's (condition, portrait rows)
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
        adapter: :class:`~fantasyportrait_core.adapter.PortraitAdapter` (on the offload device).
        path: the file it came from (re-read once if a MODEL computes in another dtype).
    """

    adapter: torch.nn.Module
    path: str
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
                blocks = load_adapter(self.path, dtype=dtype, device=host.offload_device()).ip_adapter
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
        }}

    RETURN_TYPES = ("FANTASYPORTRAIT_ADAPTER",)
    RETURN_NAMES = ("adapter",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads the FantasyPortrait adapter for FantasyPortrait Patch Model (Wan2.1 I2V loaded with the "
                   "native Load Diffusion Model or a GGUF loader). ComfyUI loads and offloads its weights "
                   "together with the MODEL.")

    def load(self, adapter, weight_dtype="auto"):
        if weight_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"weight_dtype '{weight_dtype}' is not one of {list(ADAPTER_DTYPES)}")
        path = host.model_path(host.MODEL_FOLDER, adapter)
        dtype = ADAPTER_DTYPES[weight_dtype] or default_adapter_dtype()
        return (NativeAdapter(load_adapter(path, dtype=dtype, device=host.offload_device()), path),)


# ----------------------------------------------------------------------------------------------
# The patched cross-attention


def portrait_cross_attention(attn, k_proj, v_proj, x, context, context_img_len=None, transformer_options={}):
    """ComfyUI's ``WanI2VCrossAttention.forward`` plus the portrait term before ``o``.

    Text and image attention are computed exactly as ComfyUI does (same modules, same
    ``optimized_attention``); when ``transformer_options[STATE_KEY]`` holds this forward's
    ``(PortraitCondition, rows)`` the output gains ``apply_portrait(q, ...)`` on those batch rows
    (all rows when ``rows`` is ``None``) before the output projection.

    Args:
        attn: the block's ``WanI2VCrossAttention``.
        k_proj, v_proj: that block's adapter projections.
        x: ``[B, L, dim]``; context: ``[B, 257 + L_text, dim]`` (image tokens first).
    Returns:
        ``[B, L, dim]``.
    """
    from comfy.ldm.modules.attention import optimized_attention

    context_img = context[:, :context_img_len]
    context = context[:, context_img_len:]
    q = attn.norm_q(attn.q(x))
    k = attn.norm_k(attn.k(context))
    v = attn.v(context)
    k_img = attn.norm_k_img(attn.k_img(context_img))
    v_img = attn.v_img(context_img)
    img_x = optimized_attention(q, k_img, v_img, heads=attn.num_heads, transformer_options=transformer_options)
    out = optimized_attention(q, k, v, heads=attn.num_heads, transformer_options=transformer_options)
    out = out + img_x
    state = transformer_options.get(STATE_KEY)
    if state is not None:
        out = add_portrait(out, q, state, attn.num_heads, k_proj, v_proj)
    return attn.o(out)


def add_portrait(out: torch.Tensor, q: torch.Tensor, state, heads: int, k_proj, v_proj) -> torch.Tensor:
    """``out + apply_portrait(q)`` on the batch rows of ``state = (condition, rows)``.

    Args:
        out, q: ``[B, L, H·D]`` attention output and normalised query.
        rows: long ``[R]`` batch rows that get the portrait term, or ``None`` for all.
    """
    cond, rows = state
    b, length, width = q.shape
    if rows is None:
        term = apply_portrait(q.view(b, length, heads, width // heads), cond, k_proj, v_proj)
        return out if term is None else out + term
    term = apply_portrait(q[rows].view(len(rows), length, heads, width // heads), cond, k_proj, v_proj)
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


def select_frames(cond: PortraitCondition, frames: list[int]) -> PortraitCondition:
    """The expression windows and person map of the given latent frames (in that order)."""
    idx = torch.as_tensor(frames, dtype=torch.long, device=cond.windows.device)
    lp = None if cond.latent_person is None else cond.latent_person[idx.to(cond.latent_person.device)]
    return PortraitCondition(cond.windows[:, idx], cond.token_person, lp, cond.scale)


class NativePortrait:
    """The ``DIFFUSION_MODEL`` wrapper of a patched MODEL: what its cross-attention adds, per forward.

    Args:
        portrait: FP_PORTRAIT (:class:`nodes.portrait.PortraitInputs`).
        adapter: the PortraitAdapter (its expression-token path makes the tokens).
        kv_blocks: the adapter's ``ip_adapter`` blocks in the MODEL's compute dtype.
    """

    def __init__(self, portrait, adapter, kv_blocks):
        self.portrait, self.adapter, self.kv_blocks = portrait, adapter, kv_blocks
        self.available = P.frames_for(portrait.drivers)  # pixel frames (4k+1) every driver covers
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
            need = 4 * (last - 1) + 1
            raise ValueError(f"the latent is {need} frames long but a driving expression has only "
                             f"{min(d.num_frames for d in self.portrait.drivers)}; set WanImageToVideo length to at "
                             f"most {self.available}")
        # one condition per run: for the whole available length under context windows (windows
        # come in any order), else for this latent's length
        num_frames = self.available if frames is not None else 4 * (f_lat - 1) + 1
        dtype = self.kv_projections(0)[0].weight.dtype
        key = (w * TOKEN_STRIDE, h * TOKEN_STRIDE, num_frames, device, dtype)
        if self._cond is None or self._cond[0] != key:
            layout = portrait_layout(self.portrait, w * TOKEN_STRIDE, h * TOKEN_STRIDE, num_frames)
            with torch.no_grad():
                c = P.portrait_condition(self.adapter, self.portrait.drivers, num_frames, layout, self.portrait.scale)
            moved = PortraitCondition(
                c.windows.to(device=device, dtype=dtype),
                None if c.token_person is None else c.token_person.to(device),
                None if c.latent_person is None else c.latent_person.to(device), c.scale)
            self._cond, self._windows = (key, moved), {}
        cond = self._cond[1]
        if frames is None:
            return cond if cond.windows.shape[1] == f_lat else select_frames(cond, list(range(f_lat)))
        k = tuple(frames)
        if k not in self._windows:
            self._windows[k] = select_frames(cond, list(frames))
        return self._windows[k]

    def __call__(self, executor, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={},
                 **kwargs):
        """``DIFFUSION_MODEL`` wrapper around ``WanModel._forward`` (``x [B, 36, F, H/8, W/8]``)."""
        rows = portrait_rows(x.shape[0], transformer_options)
        if rows is False or self.portrait.scale == 0.0:
            return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)
        if time_dim_concat is not None or kwargs.get("reference_latent") is not None:
            raise ValueError("FantasyPortrait patches Wan2.1 I2V; this MODEL got extra frame inputs (time_dim_concat / "
                             "reference_latent) that it does not take")
        f_lat, lat_h, lat_w = x.shape[2:]
        if lat_h % 2 or lat_w % 2:
            raise ValueError(f"width and height must be multiples of 16 for FantasyPortrait, got {lat_w * 8}x{lat_h * 8}")
        window = transformer_options.get("context_window")
        frames = list(window.index_list) if window is not None and hasattr(window, "index_list") else None
        cond = self.condition((f_lat, lat_h // 2, lat_w // 2), frames, x.device)
        options = dict(transformer_options)
        options[STATE_KEY] = (cond, None if rows is None else rows.to(x.device))
        blocks = executor.class_obj.blocks
        if len(blocks) != self.adapter.num_layers:
            raise ValueError(f"the adapter has {self.adapter.num_layers} blocks, this MODEL {len(blocks)}")
        saved = [b.cross_attn.__dict__.get("forward") for b in blocks]
        try:
            for i, b in enumerate(blocks):
                b.cross_attn.forward = functools.partial(portrait_cross_attention, b.cross_attn, *self.kv_projections(i))
            return executor(x, timestep, context, clip_fea, time_dim_concat, options, **kwargs)
        finally:
            for b, f in zip(blocks, saved):
                if f is None:
                    del b.cross_attn.forward
                else:
                    b.cross_attn.forward = f


def window_image_condition(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                           **kwargs):
    """``APPLY_MODEL`` wrapper: under ComfyUI's context windows, give each window its frames of the I2V
    image condition (``c_concat``: 4 mask + 16 reference-latent channels per latent frame).

    ComfyUI 0.3.64's context handler windows ``x`` along the frames (``dim=2`` for Wan) but not the
    5-D ``c_concat``, so Wan2.1 I2V fails there with a size mismatch. Cutting it with the window's
    own ``index_list`` is what our sampler's context windows do (``context.slice_conditioning``):
    the window holding latent frame 0 sees the reference image, the others see its empty frames.
    """
    window = transformer_options.get("context_window")
    if (window is not None and c_concat is not None and c_concat.ndim == 5 and c_concat.shape[2] != x.shape[2]
            and len(window.index_list) == x.shape[2] and max(window.index_list) < c_concat.shape[2]):
        c_concat = window.get_tensor(c_concat, dim=2)
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def check_wan_i2v(diffusion_model, adapter):
    """Raise ``ValueError`` unless ``diffusion_model`` is ComfyUI's Wan2.1 I2V ``WanModel`` whose width and
    block count match the adapter's."""
    blocks = getattr(diffusion_model, "blocks", None)
    if (type(diffusion_model).__name__ != "WanModel" or getattr(diffusion_model, "model_type", None) != "i2v"
            or not blocks or not hasattr(blocks[0].cross_attn, "k_img")):
        raise ValueError(f"model must be Wan2.1 image-to-video 14B (e.g. wan2.1_i2v_720p_14B_*.safetensors or a GGUF of "
                         f"it in Load Diffusion Model / Unet Loader (GGUF)); got {type(diffusion_model).__name__} "
                         f"{getattr(diffusion_model, 'model_type', '')}")
    params = list(inspect.signature(type(blocks[0].cross_attn).forward).parameters)
    if params[:5] != ["self", "x", "context", "context_img_len", "transformer_options"]:
        raise ValueError(f"this ComfyUI's Wan cross-attention forward{tuple(params)} is not the one FantasyPortrait "
                         f"Patch Model mirrors (ComfyUI 0.3.6x: x, context, context_img_len, transformer_options); "
                         f"update ComfyUI, or use FantasyPortrait Model Loader + Sampler")
    if adapter.num_layers != len(blocks) or adapter.dim != diffusion_model.dim:
        raise ValueError(f"the FantasyPortrait adapter fits a {adapter.num_layers}-block, {adapter.dim}-wide Wan; the "
                         f"model has {len(blocks)} blocks of width {diffusion_model.dim}: use Wan2.1 I2V 14B")


class FantasyPortraitPatchModel:
    """ComfyUI's own Wan2.1 I2V MODEL + adapter + portrait conditioning -> MODEL with the portrait branch."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "Wan2.1 I2V 14B from Load Diffusion Model (bf16 / fp8) or a GGUF loader, "
                                           "with any LoRAs (LoraLoaderModelOnly) before or after this node."}),
            "adapter": ("FANTASYPORTRAIT_ADAPTER", {"tooltip": "From FantasyPortrait Adapter Loader."}),
            "portrait": ("FP_PORTRAIT", {"tooltip": "From FantasyPortrait Conditioning (faces, expressions, "
                                                    "portrait_scale)."}),
        }}

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
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
            "cfg": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 20.0, "step": 0.1,
                              "tooltip": "Text guidance; 1 = off (the reference setting, saves a pass; also use 1 "
                                         "with the lightx2v step-distill LoRA)."}),
            "portrait_cfg": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 20.0, "step": 0.1,
                                       "tooltip": "Portrait guidance; 1 or less = off (as the reference). The reference "
                                                  "uses 4."}),
        }}

    RETURN_TYPES = ("GUIDER",)
    RETURN_NAMES = ("guider",)
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

"""Checkpoint formats: detection from keys, strict streaming loads into meta-built models.

Supported (key names: ``../shared/reference/*_keys.json``):

* Wan2.1-I2V transformer, original Wan keys (``blocks.N.self_attn.q.weight``, ``patch_embedding``,
  ``img_emb``…), one file or shards, optional ``model.diffusion_model.`` prefix (Comfy-Org repack),
  fp32/bf16/fp16/fp8_e4m3fn, and "fp8 scaled" files (``scaled_fp8`` marker + per-tensor
  ``*.scale_weight``), dequantised on load.
* Wan2.1-I2V transformer, diffusers layout (``diffusion_pytorch_model-*.safetensors`` + index).
* Wan2.1-I2V transformer as GGUF (``.gguf``, Q2_K … Q8_0 / F16 / BF16, original Wan keys without prefix as
  city96 publishes them: ``blocks.N.self_attn.q.weight``, ``patch_embedding.weight`` kept 5-D in F32),
  through diffusers' GGUF support (``GGUFQuantizationConfig``; quantised linears stay quantised and
  are dequantised per matmul, ``gguf`` package).
* FantasyPortrait adapter: official ``fantasyportrait_model.ckpt`` (pickled dict of
  ``proj_model``/``mouth_proj_model``/``emo_proj_model``/``ip_adapter`` state dicts, loaded with
  ``weights_only=True``) and the flat repacked safetensors (``proj_model.*``… ``ip_adapter.blocks.N.
  cross_attn.ip_adapter_single_stream_{k,v}_proj.weight``, ``pd_fpg.*``).
* PD-FGC expression encoder: ``pd_fpg.pth`` or the ``pd_fpg.*`` keys of the repacked file.

Models are built with parameters on the meta device and each tensor is read from the
memory-mapped file, cast and moved to its target device one at a time, so host RAM holds at most
one tensor beyond the (memory-mapped) file pages. Every load is strict: missing, unexpected or
mis-shaped keys raise :class:`CheckpointError` naming the file, the detected format and the keys.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable

import torch

from fantasyportrait_core.weights.config import WAN22_I2V_EXPERT, check_i2v, check_wan22_expert, infer_transformer_config
from fantasyportrait_core.weights.files import (FLOAT_DTYPES, GGUF_EXT, CheckpointError, TensorSource,
                                                gguf_tensor_shapes)
from fantasyportrait_core.weights.keys import (ENCODER_GROUPS, adapter_key_map, detect_transformer_format, flash_kv_key_map,
                                               is_portrait_key, is_transformer_key, portrait_family,
                                               wan_original_to_diffusers)

log = logging.getLogger("FantasyPortrait")


def _check_dtypes(path, fmt: str, source: "TensorSource", key_map: dict[str, str], integer_ok=lambda k: False):
    """Every weight must be stored as a float type (an integer or bool tensor where a weight belongs
    means a damaged or foreign file, and casting it would load garbage silently).

    Raises:
        CheckpointError: naming the first offending keys and their dtypes.
    """
    bad = [f"{src} ({source.dtype(src)})" for target, src in key_map.items()
           if not integer_ok(target) and source.dtype(src) not in FLOAT_DTYPES]
    if bad:
        raise CheckpointError(f"{path} [{fmt}]: {len(bad)} weight(s) stored as non-float types (e.g. {bad[:3]}); the "
                              f"file is damaged or not this model: download it again")


def _check_keys(path, fmt, expected: dict, found: dict):
    """expected/found: target key -> shape. Raises CheckpointError listing the first offenders."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k}: file {tuple(found[k])} vs model {tuple(expected[k])}" for k in expected
             if k in found and tuple(found[k]) != tuple(expected[k])]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:4]})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {wrong[:3]})")
        raise CheckpointError(f"{path} [{fmt}]: does not fit the model: " + "; ".join(parts))


def _assign(module: torch.nn.Module, source: TensorSource, key_map: dict[str, str], device, dtype_for: Callable):
    """Read each source key, cast/move it, and assign it into ``module`` (names and shapes were
    checked beforehand by :func:`_check_keys`)."""
    sd = {target: (t := source.get(src)).to(device=device, dtype=dtype_for(target, t)) for target, src in key_map.items()}
    missing, unexpected = module.load_state_dict(sd, strict=False, assign=True)
    assert not unexpected and not missing, (missing[:4], unexpected[:4])
    return module


# --------------------------------------------------------------------------------------------
# Transformer


_FP32_MODULES = ("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")


def _check_family(where, fmt: str, config: dict, family: str):
    (check_wan22_expert if family == WAN22_I2V_EXPERT else check_i2v)(where, fmt, config)


def load_transformer(paths, dtype: torch.dtype = torch.bfloat16, device="cpu", storage_dtype: torch.dtype | None = None,
                     num_heads: int | None = None, family: str = "Wan2.1-I2V"):
    """Load a Wan2.1-I2V transformer from any supported format into diffusers ``WanTransformer3DModel``.

    Args:
        paths: file, shard list, any one shard of a set, index json or folder; a ``.gguf`` file goes
            to :func:`load_transformer_gguf`.
        dtype: compute dtype of the weights (bf16 / fp16 / fp32). Modules diffusers keeps in fp32
            (time embedder, modulation tables, norms) stay fp32.
        storage_dtype: ``torch.float8_e4m3fn`` stores the linear layers of the blocks as scaled fp8
            (:mod:`fantasyportrait_core.model.fp8`; fp8-scaled files keep their stored bits and scales,
            others are quantised per tensor) and upcasts them to ``dtype`` per matmul; ``None``
            stores everything in ``dtype`` (fp8-scaled files are dequantised).
        num_heads: attention heads when not ``dim // 128``.
        family: what the file must hold: ``"Wan2.1-I2V"`` (default) or
            :data:`~fantasyportrait_core.weights.config.WAN22_I2V_EXPERT` (one Wan2.2-I2V-A14B expert, no
            CLIP image branch; both experts: :func:`~fantasyportrait_core.weights.experts.load_wan22_experts`).
    Returns:
        The model in eval mode on ``device``.
    Raises:
        CheckpointError: unreadable file, unknown format, another model family, or keys/shapes that do not match.
        ValueError: an unsupported ``storage_dtype``.
    """
    from fantasyportrait_core.model.fp8 import FP8, fp8_linear_names, quantize_fp8, swap_in_fp8_linears
    from fantasyportrait_core.model.build import build_transformer

    if storage_dtype not in (None, FP8):
        raise ValueError(f"storage_dtype must be None or torch.float8_e4m3fn, got {storage_dtype}")
    if isinstance(paths, (str, os.PathLike)) and os.fspath(paths).lower().endswith(GGUF_EXT):
        if storage_dtype is not None:
            raise ValueError(f"{os.path.basename(os.fspath(paths))} is a GGUF file, already quantised: set storage to "
                             f"'same' (CLI: drop --fp8); fp8 storage is for bf16/fp16/fp32 checkpoints")
        return load_transformer_gguf(os.fspath(paths), dtype=dtype, device=device, num_heads=num_heads, family=family)
    source = TensorSource(paths)
    portrait_family = _transformer_family(source)
    fmt, prefix, scaled = detect_transformer_format(source.keys())
    key_map = {}
    for k in source.keys():
        if not k.startswith(prefix) or is_portrait_key(k):  # FlashPortrait's K/V and encoder: load_adapter
            continue
        body = k[len(prefix):]
        if body == "scaled_fp8" or body.endswith(".scale_weight") or body.endswith(".scale_input"):
            continue
        key_map[wan_original_to_diffusers(body) if fmt == "wan_original" else body] = k
    shapes = {t: source.shape(s) for t, s in key_map.items()}
    where = source.paths[0] if len(source.paths) == 1 else f"{os.path.dirname(source.paths[0])} ({len(source.paths)} shards)"
    try:
        config = infer_transformer_config(shapes, num_heads)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{where} [{fmt}]: incomplete or damaged Wan transformer, cannot infer its config "
                              f"({type(e).__name__}: {e}); download it again") from e
    _check_family(where, fmt, config, family)
    model = build_transformer(config, empty=True)
    _check_keys(where, fmt + (" fp8-scaled" if scaled else ""), {k: tuple(v.shape) for k, v in model.state_dict().items()},
                shapes)
    _check_dtypes(where, fmt, source, key_map)

    def scale_of(src):
        key = src[: -len(".weight")] + ".scale_weight"
        return source.get(key).float().reshape(()) if scaled and src.endswith(".weight") and key in source else None

    fp8_weights = set()
    if storage_dtype is not None:
        names = fp8_linear_names(model)
        swap_in_fp8_linears(model, names, bias_dtype=dtype)
        fp8_weights = {n + ".weight" for n in names}

    sd = {}
    for target, src in key_map.items():
        t, scale = source.get(src), scale_of(src)
        if target in fp8_weights:
            if scale is not None and t.dtype == FP8:
                q = t  # keep the file's fp8 bits and scale
            else:  # quantise on the target device (a GPU does it in milliseconds)
                t = t.to(device)
                q, scale = quantize_fp8(t if scale is None else t.float() * scale.to(device))
            sd[target] = q.to(device)
            sd[target[: -len(".weight")] + ".scale"] = scale.to(device)
            continue
        if scale is not None:
            t = t.float() * scale
        keep32 = any(part in target.split(".") for part in _FP32_MODULES)
        sd[target] = t.to(device=device, dtype=torch.float32 if keep32 else dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    assert not unexpected and not missing, (missing[:4], unexpected[:4])
    # FlashPortrait: the file's emo_{k,v}_proj belong to the adapter; remember where they are.
    model.portrait_family = portrait_family
    model.portrait_kv_paths = list(source.paths) if portrait_family == "flashportrait" else None
    log.info("[FantasyPortrait] loaded transformer %s [%s%s] (%d layers, dim %d%s)", where, fmt,
             ", FlashPortrait" if portrait_family == "flashportrait" else "", config["num_layers"],
             config["num_attention_heads"] * config["attention_head_dim"], ", fp8 scaled" if fp8_weights else "")
    return model.eval().requires_grad_(False)


def _transformer_family(source: TensorSource) -> str:
    """``"flashportrait"`` (the file has ``emo_k_proj``) or ``"wan"``; a portrait-only file given as
    the transformer raises a one-line :class:`CheckpointError` saying where it goes instead."""
    keys = source.keys()
    family = portrait_family(keys)
    has_dit = any(is_transformer_key(k, p) for k in keys for p in ("", "model.diffusion_model."))
    name = os.path.basename(source.paths[0])
    if not has_dit and family == "fantasyportrait":
        raise CheckpointError(f"{name} is a FantasyPortrait adapter (ip_adapter K/V), not a transformer: choose it as the "
                              f"adapter and a Wan2.1-I2V-14B checkpoint as the transformer")
    if not has_dit and family in ("flashportrait", "flashportrait encoder"):
        raise CheckpointError(f"{name} is FlashPortrait's portrait encoder, not a transformer: choose it as the adapter "
                              f"and FlashPortrait's transformer.pt as the transformer")
    return "flashportrait" if family == "flashportrait" else "wan"


def check_family(transformer, adapter, transformer_name: str = "transformer", adapter_name: str = "adapter") -> None:
    """Refuse a FantasyPortrait adapter on FlashPortrait's DiT and a FlashPortrait adapter on a plain
    Wan DiT (either would run with the wrong attention weights and give a silently wrong video).

    Raises:
        CheckpointError: one line naming both files and the fix.
    """
    t_family = getattr(transformer, "portrait_family", "wan")
    a_family = getattr(adapter, "family", "fantasyportrait")
    if t_family == "flashportrait" and a_family != "flashportrait":
        raise CheckpointError(f"{transformer_name} is FlashPortrait's transformer but {adapter_name} is a FantasyPortrait "
                              f"adapter: choose FlashPortrait's portrait_encoder.pt as the adapter, or the plain "
                              f"Wan2.1-I2V transformer with this adapter")
    if t_family != "flashportrait" and a_family == "flashportrait":
        raise CheckpointError(f"{adapter_name} is a FlashPortrait portrait encoder but {transformer_name} is not "
                              f"FlashPortrait's transformer: choose FlashPortrait's transformer.pt (a whole fine-tuned "
                              f"DiT) as the transformer, or a FantasyPortrait adapter")


def load_transformer_gguf(path: str, dtype: torch.dtype = torch.bfloat16, device="cpu", num_heads: int | None = None,
                          family: str = "Wan2.1-I2V"):
    """Load a GGUF Wan2.1-I2V transformer (city96 layout) through diffusers' GGUF support.

    The key names and shapes are checked strictly against the model first (same messages as the
    other formats); then ``WanTransformer3DModel.from_single_file`` with
    ``GGUFQuantizationConfig(compute_dtype=dtype)`` and the config inferred from the shapes (nothing
    is fetched from the Hub). Quantised linears become diffusers ``GGUFLinear`` layers holding the
    quantised bytes (dequantised per matmul; CUDA kernels when the ``kernels`` package provides
    them), everything else is ``dtype`` (time embedder, modulation tables and norms in fp32).

    Returns:
        The model in eval mode on ``device``.
    Raises:
        CheckpointError: unreadable file, not a Wan2.1 transformer, or keys/shapes that do not fit.
    """
    import tempfile

    from diffusers import GGUFQuantizationConfig, WanTransformer3DModel

    from fantasyportrait_core.model.build import build_transformer

    file_shapes = gguf_tensor_shapes(path)
    fmt, prefix, _ = detect_transformer_format(file_shapes)
    shapes = {}
    for k, shape in file_shapes.items():
        if k.startswith(prefix):
            body = k[len(prefix):]
            shapes[wan_original_to_diffusers(body) if fmt == "wan_original" else body] = shape
    try:
        config = infer_transformer_config(shapes, num_heads)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{path} [gguf {fmt}]: incomplete or damaged Wan transformer, cannot infer its config "
                              f"({type(e).__name__}: {e})") from e
    _check_family(path, f"gguf {fmt}", config, family)
    empty = build_transformer(config, empty=True)
    _check_keys(path, f"gguf {fmt}", {k: tuple(v.shape) for k, v in empty.state_dict().items()}, shapes)
    del empty
    with tempfile.TemporaryDirectory(prefix="fp_gguf_config_") as folder:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"_class_name": "WanTransformer3DModel", **config}, f)
        try:
            model = WanTransformer3DModel.from_single_file(
                path, config=folder, quantization_config=GGUFQuantizationConfig(compute_dtype=dtype), torch_dtype=dtype,
                local_files_only=True)
        except Exception as e:
            raise CheckpointError(f"{path} [gguf]: diffusers could not load it ({type(e).__name__}: {e})") from e
    log.info("[FantasyPortrait] loaded GGUF transformer %s (%d layers, dim %d)", path, config["num_layers"],
             config["num_attention_heads"] * config["attention_head_dim"])
    return model.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Portrait adapter


def _adapter_config(shapes: dict, kv_shapes: dict) -> dict:
    """:class:`~fantasyportrait_core.model.adapter.PortraitAdapter` sizes from the token path's tensor
    ``shapes`` and the per-block K/V ``kv_shapes`` (adapter key names; the same dict for a FantasyPortrait
    adapter, FlashPortrait's ``emo_{k,v}_proj`` mapped to those names for FlashPortrait).

    Raises:
        KeyError / ValueError: a tensor the sizes are read from is missing.
    """
    k0 = kv_shapes["ip_adapter.blocks.0.cross_attn.ip_adapter_single_stream_k_proj.weight"]
    cfg = dict(
        dim=k0[0], proj_dim=k0[1],
        num_layers=1 + max(int(k.split(".")[2]) for k in kv_shapes if k.startswith("ip_adapter.blocks.")),
        resampler_dim=shapes["mouth_proj_model.latents"][2],
        resampler_depth=1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("mouth_proj_model.layers.")),
        resampler_dim_head=64,
    )
    cfg["resampler_heads"] = shapes["mouth_proj_model.layers.0.0.to_q.weight"][0] // cfg["resampler_dim_head"]
    return cfg


def load_adapter(path: str, dtype: torch.dtype = torch.bfloat16, device="cpu", kv_from=None, **overrides):
    """Load the FantasyPortrait adapter (official ``.ckpt`` or repacked ``.safetensors``) or FlashPortrait's
    portrait encoder + per-block K/V (family detected from the keys, see :func:`load_flash_adapter`).

    ``kv_from``: FlashPortrait only: the transformer file(s) holding ``emo_{k,v}_proj`` (what
    :func:`load_transformer` records as ``model.portrait_kv_paths``) when ``path`` has none.

    ``dtype`` applies to the per-block K/V projections; the expression-token path is kept in fp32.

    Sizes come from the tensors (width, blocks, token width, resampler width and depth);
    resampler heads assume the released head size 64 unless ``resampler_heads`` /
    ``resampler_dim_head`` are given.

    Returns:
        :class:`~fantasyportrait_core.model.adapter.PortraitAdapter` in eval mode.
    Raises:
        CheckpointError: unreadable file, code-carrying pickle, unknown format or key mismatch.
    """
    from fantasyportrait_core.model.adapter import PortraitAdapter
    from fantasyportrait_core.model.build import parameters_on_meta

    source = TensorSource(path)
    family = portrait_family(source.keys())
    if family in ("flashportrait", "flashportrait encoder"):
        return load_flash_adapter(source, dtype=dtype, device=device, kv_from=kv_from, **overrides)
    if family == "fantasyportrait" and kv_from:
        raise CheckpointError(f"{os.path.basename(path)} is a FantasyPortrait adapter but the transformer is "
                              f"FlashPortrait's: choose FlashPortrait's portrait_encoder.pt as the adapter, or the plain "
                              f"Wan2.1-I2V transformer with this adapter")
    fmt, key_map = adapter_key_map(source.keys())
    shapes = {t: source.shape(s) for t, s in key_map.items()}
    try:
        cfg = _adapter_config(shapes, shapes)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path} [{fmt}]: incomplete FantasyPortrait adapter (missing {e})") from e
    cfg.update(overrides)
    with parameters_on_meta():
        adapter = PortraitAdapter(**cfg)
    _check_keys(path, fmt, {k: tuple(v.shape) for k, v in adapter.state_dict().items()}, shapes)
    _check_dtypes(path, fmt, source, key_map)
    # The token path (projection + resamplers, 164 M parameters) stays fp32 as in the reference,
    # where it runs outside autocast; the per-block K/V projections take the transformer's dtype.
    _assign(adapter, source, key_map, device, lambda k, t: dtype if k.startswith("ip_adapter.") else torch.float32)
    return adapter.eval().requires_grad_(False)


def load_adapter_for(transformer, path: str, dtype: torch.dtype = torch.bfloat16, device="cpu",
                     transformer_name: str = "transformer", adapter_name: str | None = None):
    """The portrait adapter that goes with a loaded transformer, for either family: FantasyPortrait's
    adapter on a plain Wan2.1 DiT, or FlashPortrait's portrait encoder on FlashPortrait's DiT (K/V read
    from the transformer's file, ``transformer.portrait_kv_paths``, or from ``path`` when it is the
    single-file repack). The one loader the Model Loader node and the CLI call.

    Raises:
        CheckpointError: as :func:`load_adapter`, or a one-line family mismatch (:func:`check_family`).
    """
    adapter_name = adapter_name or os.path.basename(os.fspath(path))
    kv_from = getattr(transformer, "portrait_kv_paths", None)
    adapter = load_adapter(path, dtype=dtype, device=device, kv_from=kv_from)
    check_family(transformer, adapter, transformer_name, adapter_name)
    return adapter


def load_flash_adapter(source: TensorSource | str, dtype: torch.dtype = torch.bfloat16, device="cpu", kv_from=None,
                       **overrides):
    """FlashPortrait's portrait side as a :class:`~fantasyportrait_core.model.adapter.PortraitAdapter`
    with ``family="flashportrait"``.

    The token path comes from the file's ``proj_model.*`` / ``mouth_proj_model.*`` /
    ``emo_proj_model.*`` (``portrait_encoder.pt``: FantasyPortrait's names, FlashPortrait's weights); the
    per-block ``blocks.N.cross_attn.emo_{k,v}_proj.weight`` ``[dim, proj_dim]`` of FlashPortrait's DiT go
    into the adapter's K/V slots (``ip_adapter.blocks.N.cross_attn.ip_adapter_single_stream_{k,v}_proj``),
    read from the same file (single-file repack) or from ``kv_from`` (``transformer.pt``). Every key is
    accounted for: encoder groups and K/V strictly (missing/unexpected named), ``pd_fpg.*`` belongs
    to the expression encoder, Wan DiT keys to the transformer loader; anything else is unexpected.

    Raises:
        CheckpointError: no K/V anywhere (one line saying which file holds them), a FlashPortrait
            transformer without its encoder, or keys/shapes that do not fit.
    """
    from fantasyportrait_core.model.adapter import PortraitAdapter
    from fantasyportrait_core.model.build import parameters_on_meta

    source = source if isinstance(source, TensorSource) else TensorSource(source)
    path = source.paths[0]
    name = os.path.basename(path)
    keys = source.keys()
    prefix = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in keys) else ""
    if not any(k.startswith(ENCODER_GROUPS) for k in keys):
        raise CheckpointError(f"{name} is FlashPortrait's transformer (emo_k_proj), not its portrait encoder: choose it "
                              f"as the transformer (native path: Load Diffusion Model) and portrait_encoder.pt as the adapter")
    key_map = {k: k for k in keys if not is_transformer_key(k, prefix) and not k.startswith("pd_fpg.")
               and not flash_kv_key_map([k])}
    kv_map, kv_source = flash_kv_key_map(keys), source
    fmt = "FlashPortrait single file" if kv_map else "FlashPortrait portrait_encoder"
    if not kv_map and kv_from:
        kv_source = TensorSource(kv_from)
        kv_map = flash_kv_key_map(kv_source.keys())
    if not kv_map:
        raise CheckpointError(f"{name} is FlashPortrait's portrait encoder; its per-block K/V (emo_k_proj/emo_v_proj) are "
                              f"in FlashPortrait's transformer.pt: load that as the transformer (native path: name it "
                              f"in flashportrait_transformer)")
    shapes = {t: source.shape(s) for t, s in key_map.items()}
    kv_shapes = {t: kv_source.shape(s) for t, s in kv_map.items()}
    try:
        cfg = dict(_adapter_config(shapes, kv_shapes), family="flashportrait")
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{name} [{fmt}]: incomplete FlashPortrait portrait encoder or K/V (missing {e})") from e
    cfg.update(overrides)
    with parameters_on_meta():
        adapter = PortraitAdapter(**cfg)
    _check_keys(name, fmt, {k: tuple(v.shape) for k, v in adapter.state_dict().items()}, {**shapes, **kv_shapes})
    _check_dtypes(name, fmt, source, key_map)
    _check_dtypes(name, fmt, kv_source, kv_map)
    sd = {t: source.get(s).to(device=device, dtype=torch.float32) for t, s in key_map.items()}
    sd.update({t: kv_source.get(s).to(device=device, dtype=dtype) for t, s in kv_map.items()})
    missing, unexpected = adapter.load_state_dict(sd, strict=False, assign=True)
    assert not unexpected and not missing, (missing[:4], unexpected[:4])
    # A small fingerprint of FlashPortrait's fine-tuned DiT (block 0's cross-attention output bias) so
    # the native patch can tell its MODEL from a plain Wan2.1 one (check_flash_dit).
    probe = next((k for k in kv_source.keys() if k.endswith("blocks.0.cross_attn.o.bias")), None)
    adapter.dit_fingerprint = None if probe is None else kv_source.get(probe).float().clone()
    log.info("[FantasyPortrait] loaded FlashPortrait portrait encoder %s [%s] (%d blocks of K/V)", name, fmt,
             cfg["num_layers"])
    return adapter.eval().requires_grad_(False)


def check_flash_dit(dit_bias: torch.Tensor | None, adapter, model_name: str = "model") -> None:
    """For a FlashPortrait adapter: refuse a DiT whose block-0 cross-attention output bias is not the
    fingerprint recorded from FlashPortrait's transformer file (:func:`load_flash_adapter`), i.e. a plain
    Wan2.1 DiT (FlashPortrait fine-tuned every attention parameter). A difference within bf16/fp16
    storage rounding (relative 2^-7) counts as the same weights. No fingerprint or no bias: no check.

    Raises:
        CheckpointError: one line naming the fix.
    """
    fp = getattr(adapter, "dit_fingerprint", None)
    if getattr(adapter, "family", None) != "flashportrait" or fp is None or dit_bias is None:
        return
    b = dit_bias.detach().float().cpu().reshape(-1)
    if b.shape != fp.shape:
        return
    off = ((b - fp).abs() > fp.abs() * 2 ** -7 + 1e-6).float().mean().item()
    if off > 0.01:
        raise CheckpointError(f"{model_name} is not FlashPortrait's transformer ({off:.0%} of a fingerprint differs): load "
                              f"FlashPortrait's transformer.pt in Load Diffusion Model for this FlashPortrait adapter, "
                              f"or use a FantasyPortrait adapter with plain Wan2.1-I2V")


# --------------------------------------------------------------------------------------------
# Expression encoder

def load_expression_encoder(path: str, dtype: torch.dtype = torch.float32, device="cpu"):
    """Load PD-FGC ``FanEncoder`` from ``pd_fpg.pth`` or from the ``pd_fpg.*`` keys of the repacked
    adapter file. ``num_batches_tracked`` buffers may be absent (unused in eval).

    Raises:
        CheckpointError: unreadable file, code-carrying pickle, or keys that do not fit.
    """
    from fantasyportrait_core.model.expression import FanEncoder

    source = TensorSource(path)
    keys = source.keys()
    if any(k.startswith("pd_fpg.") for k in keys):
        fmt, key_map = "repacked pd_fpg.*", {k[len("pd_fpg."):]: k for k in keys if k.startswith("pd_fpg.")}
    elif any(k.startswith("model.conv1.") for k in keys):
        fmt, key_map = "pd_fpg.pth", {k: k for k in keys}
    else:
        raise CheckpointError(f"{path}: no PD-FGC expression encoder weights (pd_fpg) found; first keys: {keys[:5]}")
    encoder = FanEncoder()
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    optional = {k for k in expected if k.endswith("num_batches_tracked") and k not in key_map}
    _check_keys(path, fmt, {k: v for k, v in expected.items() if k not in optional},
                {t: source.shape(s) for t, s in key_map.items()})
    _check_dtypes(path, fmt, source, key_map, integer_ok=lambda k: k.endswith("num_batches_tracked"))
    sd = {t: source.get(s) for t, s in key_map.items()}
    encoder.load_state_dict(sd, strict=False)
    return encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)

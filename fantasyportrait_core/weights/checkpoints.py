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
import pickle
import re
from typing import Callable, Iterable

import torch

log = logging.getLogger("FantasyPortrait")

COMFY_PREFIX = "model.diffusion_model."
SAFETENSORS_EXT = (".safetensors", ".sft")
GGUF_EXT = (".gguf",)
PICKLE_EXT = (".ckpt", ".pth", ".pt", ".bin")


from fantasyportrait_core.validate import InputError


class CheckpointError(InputError):
    """A checkpoint that cannot be loaded: unreadable, unknown format, or keys, shapes or dtypes that do
    not fit. An :class:`~fantasyportrait_core.validate.InputError` (the file is the user's input)."""


# --------------------------------------------------------------------------------------------
# Lazy access to tensors in one or several files


class TensorSource:
    """Read-only mapping ``key -> tensor`` over safetensors (memory-mapped) or weights-only pickles.

    Args:
        paths: one path, a list of shard paths, a diffusers ``*.index.json``, or a folder holding
            one of those. One shard of a set (``*-0000i-of-0000n.safetensors``) stands for the set
            (:func:`shard_set`).
    Raises:
        CheckpointError: for a missing, truncated, corrupt or code-carrying file.
    """

    def __init__(self, paths: str | Iterable[str]):
        self.paths = _expand_paths(paths)
        self._where: dict[str, tuple[str, object]] = {}
        for path in self.paths:
            self._open(path)

    def _open(self, path: str):
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint file not found: {path}")
        if path.endswith(SAFETENSORS_EXT):
            from safetensors import safe_open

            try:
                handle = safe_open(path, framework="pt", device="cpu")
                keys = list(handle.keys())
                _check_safetensors_size(path)
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it may be truncated "
                                      f"or corrupt, download it again") from e
            for k in keys:
                self._where[k] = (path, handle)
        elif path.endswith(PICKLE_EXT):
            sd = load_pickle(path)
            for k, v in _flatten(sd).items():
                self._where[k] = (path, v)
        else:
            raise CheckpointError(f"{path}: unknown checkpoint extension; expected {SAFETENSORS_EXT + PICKLE_EXT}")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        path, h = self._where[key]
        if isinstance(h, torch.Tensor):
            return tuple(h.shape)
        return tuple(h.get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """Stored dtype as a safetensors name (``F32``, ``BF16``, ``F8_E4M3``, ``I64``, ``BOOL``...)."""
        path, h = self._where[key]
        if isinstance(h, torch.Tensor):
            return _TORCH_DTYPE_NAMES.get(h.dtype, str(h.dtype))
        return h.get_slice(key).get_dtype()

    def get(self, key: str) -> torch.Tensor:
        path, h = self._where[key]
        if isinstance(h, torch.Tensor):
            return h
        try:
            return h.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({e}); the file may be truncated") from e


_TORCH_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64",
                      torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


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


def _check_safetensors_size(path: str):
    """safetensors opens lazily; compare the header's data extent with the file size now so a
    truncated download fails at load time with a clear message."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    size = os.path.getsize(path)
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: header says {8 + n + end} bytes, file has {size}; download it again")


_SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})(?P<ext>\.safetensors)$")


def _index_files(index_path: str) -> list[str]:
    """Shard file names listed by a ``*.index.json`` (its ``weight_map`` values), sorted."""
    with open(index_path) as f:
        return sorted(set(json.load(f)["weight_map"].values()))


def shard_set(path: str) -> list[str]:
    """All shards of the set ``path`` belongs to (``name-0000i-of-0000n.safetensors``), or ``[path]``.

    ComfyUI lists every shard of a sharded release as its own model file (index json files are not
    listed), so picking any one of them must load the whole set. The set comes from an index json
    beside the shard that names it, else from the ``-of-0000n`` numbering.

    Raises:
        CheckpointError: a shard of the set is missing, naming it.
    """
    m = _SHARD_NAME.match(os.path.basename(path))
    if m is None:
        return [path]
    folder, name = os.path.dirname(path), os.path.basename(path)
    for index in sorted(f for f in os.listdir(folder or ".") if f.endswith(".index.json")):
        try:
            files = _index_files(os.path.join(folder, index))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if name in files:
            shards = [os.path.join(folder, f) for f in files]
            break
    else:
        n = int(m["n"])
        shards = [os.path.join(folder, f"{m['stem']}-{i:05d}-of-{n:05d}{m['ext']}") for i in range(1, n + 1)]
    missing = [os.path.basename(s) for s in shards if not os.path.isfile(s)]
    if missing:
        raise CheckpointError(f"{path} is one shard of a set of {len(shards)}, but {', '.join(missing[:4])} "
                              f"{'is' if len(missing) == 1 else 'are'} missing from {folder}; download all shards "
                              f"into the same folder")
    return shards


def _expand_paths(paths) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [os.fspath(paths)]
    out = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            index = [f for f in sorted(os.listdir(p)) if f.endswith(".safetensors.index.json")]
            if index:
                out += _expand_paths(os.path.join(p, index[0]))
            else:
                out += sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(SAFETENSORS_EXT))
        elif p.endswith(".index.json"):
            if not os.path.isfile(p):
                raise CheckpointError(f"checkpoint index not found: {p}")
            out += [os.path.join(os.path.dirname(p), f) for f in _index_files(p)]
        else:
            out += shard_set(p)
    out = list(dict.fromkeys(out))  # a shard list that names shards of one set expands to it once
    if not out:
        raise CheckpointError(f"no checkpoint files found in {paths}")
    return out


def load_pickle(path: str) -> dict:
    """``torch.load`` with ``weights_only=True`` (and mmap when possible): never runs pickled code.

    Raises:
        CheckpointError: if the file carries anything but tensors and plain containers, or is unreadable.
    """
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: the file holds pickled objects other than tensors (it could run code "
            f"when loaded). Use a safetensors version of this checkpoint. Detail: {str(e).splitlines()[0]}"
        ) from e
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e}); it may be truncated or corrupt") from e


def _flatten(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    return out


# --------------------------------------------------------------------------------------------
# Key maps

# Original Wan -> diffusers WanTransformer3DModel names (the rules of diffusers'
# ``convert_wan_transformer_to_diffusers``; note original norm3 is diffusers norm2). One table per
# level; the inverse map swaps each table.
_TOP = {  # whole-key prefixes outside the blocks
    "text_embedding.0.": "condition_embedder.text_embedder.linear_1.",
    "text_embedding.2.": "condition_embedder.text_embedder.linear_2.",
    "time_embedding.0.": "condition_embedder.time_embedder.linear_1.",
    "time_embedding.2.": "condition_embedder.time_embedder.linear_2.",
    "time_projection.1.": "condition_embedder.time_proj.",
    "img_emb.proj.0.": "condition_embedder.image_embedder.norm1.",
    "img_emb.proj.1.": "condition_embedder.image_embedder.ff.net.0.proj.",
    "img_emb.proj.3.": "condition_embedder.image_embedder.ff.net.2.",
    "img_emb.proj.4.": "condition_embedder.image_embedder.norm2.",
    "head.head.": "proj_out.",
    "head.modulation": "scale_shift_table",
}
_BLOCK = {  # first part of a key inside blocks.N.
    "modulation": "scale_shift_table", "self_attn": "attn1", "cross_attn": "attn2", "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
_ATTN = {  # first part inside an attention module
    "q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "k_img": "add_k_proj", "v_img": "add_v_proj",
    "norm_k_img": "norm_added_k",
}
_BLOCK_KEY = re.compile(r"^(blocks\.\d+\.)(.+)$")


def _rename_prefix(key: str, table: dict[str, str]) -> str:
    for src in sorted(table, key=len, reverse=True):  # longest match first
        if key == src or key.startswith(src if src.endswith(".") else src + "."):
            return table[src] + key[len(src):]
    return key


def _rename(key: str, forward: bool) -> str:
    top, block, attn = ((_TOP, _BLOCK, _ATTN) if forward else
                        tuple({v: k for k, v in t.items()} for t in (_TOP, _BLOCK, _ATTN)))
    m = _BLOCK_KEY.match(key)
    if m is None:
        return _rename_prefix(key, top)
    head, rest = m.groups()
    rest = _rename_prefix(rest, block)
    module, _, tail = rest.partition(".")
    if module in ("attn1", "attn2", "self_attn", "cross_attn") and tail:
        rest = f"{module}.{_rename_prefix(tail, attn)}"
    return head + rest


def wan_original_to_diffusers(key: str) -> str:
    """Map one original-Wan transformer key to its diffusers name."""
    return _rename(key, forward=True)


def _original_name(key: str) -> str:
    """Map one diffusers Wan transformer key to its original-Wan name."""
    return _rename(key, forward=False)


def detect_transformer_format(keys: Iterable[str]) -> tuple[str, str, bool]:
    """(format, prefix, fp8_scaled) of a Wan transformer state dict from its key names.

    format is ``"wan_original"`` or ``"wan_diffusers"``.

    Raises:
        CheckpointError: when the keys are neither (names a few keys seen).
    """
    keys = list(keys)
    prefix = COMFY_PREFIX if any(k.startswith(COMFY_PREFIX) for k in keys) else ""
    body = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    scaled = "scaled_fp8" in keys or "scaled_fp8" in body or any(k.endswith(".scale_weight") for k in body)
    if "patch_embedding.weight" in body and any(".self_attn.q.weight" in k for k in body):
        return "wan_original", prefix, scaled
    if "patch_embedding.weight" in body and any(".attn1.to_q.weight" in k for k in body):
        return "wan_diffusers", prefix, scaled
    raise CheckpointError(f"not a Wan2.1 transformer checkpoint (unknown format); first keys: {keys[:5]}")


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


def infer_transformer_config(shapes: dict[str, tuple], num_heads: int | None = None) -> dict:
    """Wan2.1 I2V diffusers config from diffusers-named tensor shapes.

    Head count is not visible in the weights: ``num_heads`` or ``dim // 128`` (every released
    Wan2.1 model uses head_dim 128).
    """
    from fantasyportrait_core.model.build import WAN21_I2V_14B

    pe = shapes["patch_embedding.weight"]
    dim, in_ch = pe[0], pe[1]
    num_layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    heads = num_heads or max(dim // 128, 1)
    cfg = dict(WAN21_I2V_14B)
    cfg.update(
        num_attention_heads=heads, attention_head_dim=dim // heads, in_channels=in_ch,
        out_channels=shapes["proj_out.weight"][0] // (pe[2] * pe[3] * pe[4]), patch_size=tuple(pe[2:]),
        text_dim=shapes["condition_embedder.text_embedder.linear_1.weight"][1],
        freq_dim=shapes["condition_embedder.time_embedder.linear_1.weight"][1],
        ffn_dim=shapes["blocks.0.ffn.net.0.proj.weight"][0], num_layers=num_layers,
    )
    if "condition_embedder.image_embedder.norm1.weight" in shapes:
        cfg.update(image_dim=shapes["condition_embedder.image_embedder.norm1.weight"][0], added_kv_proj_dim=dim)
    else:
        cfg.update(image_dim=None, added_kv_proj_dim=None)
    cfg["cross_attn_norm"] = "blocks.0.norm2.weight" in shapes
    return cfg


def _check_i2v(where, fmt: str, config: dict):
    """A T2V (or other) Wan transformer instead of I2V is named as such.

    Raises:
        CheckpointError: without the CLIP image branch or with other than 36 input / 16 output channels.
    """
    if config["image_dim"] is None or config["in_channels"] != 36 or config["out_channels"] != 16:
        raise CheckpointError(f"{where} [{fmt}]: a Wan transformer with {config['in_channels']} input channels and "
                              f"{'no' if config['image_dim'] is None else 'an'} image branch is not Wan2.1-I2V (36 input "
                              f"channels, CLIP image branch); FantasyPortrait needs Wan2.1-I2V-14B 480P or 720P")


_FP32_MODULES = ("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")


def load_transformer(paths, dtype: torch.dtype = torch.bfloat16, device="cpu", storage_dtype: torch.dtype | None = None,
                     num_heads: int | None = None):
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
    Returns:
        The model in eval mode on ``device``.
    Raises:
        CheckpointError: unreadable file, unknown format, or keys/shapes that do not match.
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
        return load_transformer_gguf(os.fspath(paths), dtype=dtype, device=device, num_heads=num_heads)
    source = TensorSource(paths)
    fmt, prefix, scaled = detect_transformer_format(source.keys())
    key_map = {}
    for k in source.keys():
        if not k.startswith(prefix):
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
    _check_i2v(where, fmt, config)
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
    log.info("[FantasyPortrait] loaded transformer %s [%s] (%d layers, dim %d%s)", where, fmt, config["num_layers"],
             config["num_attention_heads"] * config["attention_head_dim"], ", fp8 scaled" if fp8_weights else "")
    return model.eval().requires_grad_(False)


def gguf_tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Logical (torch-order) shapes of the tensors in a GGUF file, read from its header only.

    Raises:
        CheckpointError: unreadable file, or tensors stored reshaped (``comfy.gguf.orig_shape.*``
            metadata, used by city96's converter for SD-style UNets, not for Wan), which diffusers'
            GGUF loader does not restore.
    """
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated or "
                              f"corrupt, download it again") from e
    reshaped = [f.name for f in reader.fields.values() if f.name.startswith("comfy.gguf.orig_shape.")]
    if reshaped:
        raise CheckpointError(f"{path}: {len(reshaped)} tensors are stored reshaped ({reshaped[0]}); this loader "
                              f"takes Wan GGUF files as city96 publishes them (no reshaped tensors)")
    out = {}
    for t in reader.tensors:  # element counts, fastest-varying dimension first
        out[t.name] = tuple(int(v) for v in reversed(t.shape.tolist()))
    return out


def load_transformer_gguf(path: str, dtype: torch.dtype = torch.bfloat16, device="cpu", num_heads: int | None = None):
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
    _check_i2v(path, f"gguf {fmt}", config)
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


def transformer_state_dict_original(model) -> dict[str, torch.Tensor]:
    """A diffusers Wan transformer's weights under original Wan key names (for exporting and for
    writing test checkpoints). Raises CheckpointError if a key has no original name."""
    out = {}
    for k, v in model.state_dict().items():
        orig = _original_name(k)
        if wan_original_to_diffusers(orig) != k:
            raise CheckpointError(f"no original-Wan name for {k}")
        out[orig] = v
    return out


# --------------------------------------------------------------------------------------------
# Portrait adapter


def _adapter_key_map(keys: list[str]) -> tuple[str, dict[str, str]]:
    """(format, target->source) for the official or repacked adapter keys (``pd_fpg.*`` ignored)."""
    groups = ("proj_model.", "mouth_proj_model.", "emo_proj_model.")
    key_map = {}
    fmt = None
    ip = re.compile(r"^ip_adapter\.blocks\.(\d+)\.cross_attn\.(processor\.)?(ip_adapter_single_stream_[kv]_proj\.weight)$")
    for k in keys:
        if k.startswith(groups):
            key_map[k] = k
            continue
        m = ip.match(k)
        if m:
            fmt = "official ckpt" if m.group(2) else "repacked"
            key_map[f"ip_adapter.blocks.{m.group(1)}.cross_attn.{m.group(3)}"] = k
        elif k.startswith("pd_fpg."):
            continue
        else:
            key_map[k] = k  # reported as unexpected by the strict check
    if fmt is None or not any(k.startswith("proj_model.") for k in key_map):
        raise CheckpointError(f"not a FantasyPortrait adapter checkpoint (unknown format); first keys: {keys[:5]}")
    return fmt, key_map


def load_adapter(path: str, dtype: torch.dtype = torch.bfloat16, device="cpu", **overrides):
    """Load the FantasyPortrait adapter (official ``.ckpt`` or repacked ``.safetensors``).

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
    fmt, key_map = _adapter_key_map(source.keys())
    shapes = {t: source.shape(s) for t, s in key_map.items()}
    try:
        k0 = shapes["ip_adapter.blocks.0.cross_attn.ip_adapter_single_stream_k_proj.weight"]
        rdim = shapes["mouth_proj_model.latents"][2]
        cfg = dict(
            dim=k0[0], proj_dim=k0[1],
            num_layers=1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("ip_adapter.blocks.")),
            resampler_dim=rdim,
            resampler_depth=1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("mouth_proj_model.layers.")),
            resampler_dim_head=64,
        )
        cfg["resampler_heads"] = shapes["mouth_proj_model.layers.0.0.to_q.weight"][0] // cfg["resampler_dim_head"]
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

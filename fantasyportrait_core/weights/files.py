"""Reading checkpoint files: lazy key -> tensor access over safetensors (memory-mapped, size-checked),
weights-only pickles, shard sets and diffusers index files, and GGUF headers; :class:`CheckpointError`
for any file that cannot be read. Formats and key names: :mod:`fantasyportrait_core.weights.load`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from typing import Iterable

import torch

from fantasyportrait_core.validate import InputError

SAFETENSORS_EXT = (".safetensors", ".sft")
GGUF_EXT = (".gguf",)
PICKLE_EXT = (".ckpt", ".pth", ".pt", ".bin")


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

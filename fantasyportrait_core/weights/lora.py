"""Wan2.1 LoRA files: read any published layout and convert it to our diffusers transformer's layers.

Layouts (detected from the keys; names as published):

* ``diffusion_model.blocks.N.self_attn.q.lora_down.weight`` / ``lora_up`` or ``lora_A`` / ``lora_B``,
  optional ``.alpha``, ``.diff_b`` (bias delta), lightx2v's extra full-weight ``.diff`` (norms, head)
  and ``blocks.N.diff_m`` (modulation) keys: ComfyUI, kijai, lightx2v, diffusion-pipe files.
* ``lora_unet_blocks_N_self_attn_q.lora_down.weight`` + ``.alpha``: kohya / musubi-tuner files.
* ``transformer.blocks.N.attn1.to_q.lora_A.weight`` (diffusers / PEFT; also ``base_model.model.``).
* Original Wan keys without any prefix (``blocks.N.self_attn.q.lora_down.weight``); diffusers'
  converter does not take these, so they get the ``diffusion_model.`` prefix here first.

Conversion uses diffusers' own machinery: ``WanLoraLoaderMixin.lora_state_dict`` (alpha/rank folded
into the factors, ``diff_b`` -> ``lora_B.bias``), then ``transformer.load_lora_adapter`` and
``set_adapters`` (peft). Keys that name no layer of this transformer are reported by name and
count (:attr:`LoraWeights.unmatched`), never dropped silently. diffusers drops the full-weight
``diff``/``diff_m`` keys with an info log; here they are applied as what they are, exact parameter
deltas ``W + s·diff`` (norm weights, modulation tables, head).

Applying and removing: :mod:`fantasyportrait_core.weights.lora_apply`.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from fantasyportrait_core.weights.files import CheckpointError, TensorSource
from fantasyportrait_core.weights.keys import wan_diffusers_to_original, wan_original_to_diffusers

log = logging.getLogger("FantasyPortrait")

LORA_EXT = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
_KIND = r"(?P<kind>lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|lora_B\.bias|alpha|diff_b|diff)"
_DOTTED = re.compile(rf"^(?P<mod>.+?)\.{_KIND}$")
_MUSUBI = re.compile(rf"^lora_unet_(?P<mod>.+?)\.{_KIND}$")
_DIFF_M = re.compile(r"^(?P<mod>.+)\.diff_m$")
_DOWN, _UP = ("lora_down.weight", "lora_A.weight"), ("lora_up.weight", "lora_B.weight")
# Original-named layers diffusers' Wan LoRA converter (``_convert_non_diffusers_wan_lora_to_diffusers``)
# handles; ``k_img``/``v_img`` only when a file has both.
_CONVERTIBLE = re.compile(r"^(blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]|blocks\.\d+\.ffn\.[02]|time_projection\.1|"
                          r"head\.head|text_embedding\.[02]|time_embedding\.[02]|img_emb\.proj\.[13])$")
_IMG_KV = re.compile(r"^blocks\.\d+\.cross_attn\.[kv]_img$")


class LoraError(ValueError):
    """A LoRA file that cannot be applied: unreadable, not a Wan LoRA, or made for another model size."""


@dataclass
class LoraWeights:
    """One LoRA file, converted to this transformer's layer names.

    Attributes:
        path: the file; ``layout``: the key layout found (for messages).
        lora: diffusers-named low-rank factors, alpha/rank folded in:
            ``<layer>.lora_A.weight [r, in]``, ``<layer>.lora_B.weight [out, r]``, optional
            ``<layer>.lora_B.bias [out]`` (from ``diff_b``).
        diffs: full parameter deltas ``{diffusers parameter name: tensor}`` (``diff``/``diff_m``, and
            ``diff_b`` of layers without low-rank factors).
        unmatched: the file's keys that name no layer of the transformer (or none that a LoRA can
            change), in file order.
    """

    path: str
    layout: str
    lora: dict[str, torch.Tensor]
    diffs: dict[str, torch.Tensor]
    unmatched: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def layers(self) -> list[str]:
        return sorted({k.rsplit(".lora_", 1)[0] for k in self.lora})

    @property
    def key(self) -> str:
        """Identity of the file version (path, size, mtime): the same key means the same weights."""
        try:
            st = os.stat(self.path)
            return f"{os.path.realpath(self.path)}|{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            return f"{self.path}|{id(self)}"

    def summary(self) -> str:
        text = (f"{self.name} [{self.layout}]: low-rank deltas on {len(self.layers)} layers, "
                f"{len(self.diffs)} full-parameter deltas")
        if self.unmatched:
            text += (f"; {len(self.unmatched)} keys matched no layer of this transformer and are NOT applied "
                     f"(e.g. {', '.join(self.unmatched[:4])})")
        return text


def _base(module: nn.Module) -> nn.Module:
    """The layer under a peft LoRA wrapper (or the module itself)."""
    get = getattr(module, "get_base_layer", None)
    return get() if callable(get) else module


def lora_targets(transformer: nn.Module) -> dict[str, nn.Module]:
    """Layers a LoRA can change: ``{diffusers name: layer}`` for every ``nn.Linear`` (incl. diffusers'
    ``GGUFLinear``) and :class:`~fantasyportrait_core.model.fp8.ScaledFP8Linear`, looking through peft wrappers."""
    from fantasyportrait_core.model.fp8 import ScaledFP8Linear

    out = {}
    for name, module in transformer.named_modules():
        if ".base_layer" in name or ".lora_" in name or name.endswith(("lora_A", "lora_B")):
            continue
        base = _base(module)
        if isinstance(base, (nn.Linear, ScaledFP8Linear)):
            out[name] = base
    return out


def find_parameter(transformer: nn.Module, name: str) -> nn.Parameter | None:
    """A parameter by diffusers name, looking through peft wrappers (``None`` if there is none)."""
    owner, _, attr = name.rpartition(".")
    try:
        module = transformer.get_submodule(owner) if owner else transformer
    except AttributeError:
        return None
    p = getattr(_base(module), attr, None)
    return p if isinstance(p, torch.Tensor) else None


def _read(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise LoraError(f"LoRA file not found: {path}")
    if not path.lower().endswith(LORA_EXT):
        raise LoraError(f"{path}: not a LoRA file (expected one of {', '.join(LORA_EXT)})")
    try:
        source = TensorSource(path)
        return {k: source.get(k) for k in source.keys()}
    except CheckpointError as e:
        raise LoraError(str(e)) from e


def detect_layout(keys: Sequence[str]) -> str:
    """``"diffusion_model"``, ``"lora_unet"``, ``"diffusers"``, ``"peft"``, ``"original"`` (Wan keys,
    no prefix) or ``"diffusers_bare"`` (diffusers names, no prefix).

    Raises:
        LoraError: keys of neither kind (names a few).
    """
    keys = [k for k in keys if k != "scaled_fp8"]
    if any(k.startswith(("diffusion_model.", "model.diffusion_model.")) for k in keys):
        return "diffusion_model"
    if any(k.startswith("lora_unet_") for k in keys):
        return "lora_unet"
    if any(k.startswith("transformer.") for k in keys):
        return "diffusers"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(re.search(r"(^|\.)(self_attn|cross_attn|ffn\.[02]|head\.head|text_embedding|time_embedding)\.", k) or
           k.endswith(".diff_m") for k in keys):
        return "original"
    if any(re.search(r"\.(attn1|attn2|ffn\.net)\.", k) for k in keys):
        return "diffusers_bare"
    raise LoraError(f"not a Wan2.1 LoRA (unknown key layout); first keys: {list(keys)[:5]}")


_LAYOUT_NAMES = {
    "diffusion_model": "diffusion_model. (ComfyUI / kijai / lightx2v)", "lora_unet": "lora_unet_ (kohya / musubi)",
    "diffusers": "diffusers transformer.", "peft": "PEFT base_model.model.", "original": "original Wan keys, no prefix",
    "diffusers_bare": "diffusers names, no prefix",
}


def read_lora(path: str, transformer: nn.Module) -> LoraWeights:
    """Read a LoRA file and convert it to ``transformer``'s layer names (any layout above).

    Args:
        path: ``.safetensors`` (or a weights-only pickle).
        transformer: the diffusers ``WanTransformer3DModel`` it will be applied to (for matching
            names and checking shapes; nothing is changed).
    Returns:
        :class:`LoraWeights`; its ``unmatched`` keys are also logged as a warning.
    Raises:
        LoraError: unreadable file, unknown layout, no key matching any layer, or factors whose
            shapes do not fit (e.g. a Wan 1.3B LoRA on the 14B model), naming the layer.
    """
    raw = _read(path)
    layout = detect_layout(raw.keys())
    targets = lora_targets(transformer)
    if layout in ("diffusion_model", "lora_unet", "original"):
        lora, diffs, unmatched = _convert_wan_style(raw, layout, targets, transformer)
    else:
        lora, diffs, unmatched = _convert_diffusers_style(raw, layout, targets, transformer)
    weights = LoraWeights(path, _LAYOUT_NAMES[layout], lora, diffs, unmatched)
    if not lora and not diffs:
        raise LoraError(f"{path}: none of its {len(raw)} keys names a layer of this Wan2.1 transformer "
                        f"(e.g. {list(raw)[:4]}); is it a LoRA for another model?")
    _check_shapes(weights, targets, transformer)
    if unmatched:
        log.warning("[FantasyPortrait] LoRA %s", weights.summary())
    else:
        log.info("[FantasyPortrait] LoRA %s", weights.summary())
    return weights


def _convert_wan_style(raw: dict, layout: str, targets: dict, transformer) -> tuple[dict, dict, list]:
    """``diffusion_model.`` / ``lora_unet_`` / bare original keys -> (lora, diffs, unmatched), the low-rank
    part through diffusers' ``WanLoraLoaderMixin.lora_state_dict``."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    musubi_names = {wan_diffusers_to_original(t + ".weight")[: -len(".weight")].replace(".", "_"): t for t in targets}
    parsed = []  # (raw key, original module, diffusers module or None, kind)
    unmatched = []
    for key in raw:
        if layout == "lora_unet":
            m = _MUSUBI.match(key)
            if m is None:
                unmatched.append(key)
                continue
            module = musubi_names.get(m["mod"])
            parsed.append((key, wan_diffusers_to_original(module + ".weight")[:-7] if module else m["mod"], module, m["kind"]))
            continue
        body = key.removeprefix("model.").removeprefix("diffusion_model.") if layout == "diffusion_model" else key
        if (m := _DIFF_M.match(body)) is not None:  # modulation table delta (lightx2v)
            parsed.append((key, m["mod"], wan_original_to_diffusers(m["mod"] + ".modulation"), "diff_m"))
            continue
        m = _DOTTED.match(body)
        if m is None:
            unmatched.append(key)
            continue
        module = wan_original_to_diffusers(m["mod"] + ".weight")[: -len(".weight")]
        parsed.append((key, m["mod"], module, m["kind"]))

    downs = {module for _, _, module, kind in parsed if kind in _DOWN}
    ups = {module for _, _, module, kind in parsed if kind in _UP}
    origs = {module: orig for _, orig, module, _ in parsed}
    img_kv = {origs[m].rsplit(".", 1)[1] for m in downs & ups if m in origs and _IMG_KV.match(origs[m])}
    has_factors = {m for m in downs & ups if m in targets and (_CONVERTIBLE.match(origs[m]) or (
        _IMG_KV.match(origs[m]) and img_kv == {"k_img", "v_img"}))}
    low_rank, diffs = {}, {}
    for key, orig, module, kind in parsed:
        if kind == "diff_m":
            if find_parameter(transformer, module) is None:
                unmatched.append(key)
            else:
                diffs[module] = raw[key]
        elif kind == "diff" or (kind == "diff_b" and module not in has_factors):
            param = f"{module}.{'weight' if kind == 'diff' else 'bias'}"
            p = find_parameter(transformer, param) if module else None
            if p is None or p.dtype == torch.float8_e4m3fn or tuple(p.shape) != tuple(raw[key].shape):
                unmatched.append(key)
            else:
                diffs[param] = raw[key]
        elif module in has_factors and kind != "lora_B.bias":
            low_rank[key] = raw[key]
        else:
            unmatched.append(key)
    if not low_rank:
        return {}, diffs, unmatched

    # diffusers' converter wants prefixed keys; bare original keys get the prefix it knows.
    by_key = {key: (orig, module, kind) for key, orig, module, kind in parsed}
    if layout == "original":
        low_rank = {"diffusion_model." + k: v for k, v in low_rank.items()}
    elif layout == "diffusion_model":
        low_rank = {"diffusion_model." + k.removeprefix("model.").removeprefix("diffusion_model."): v
                    for k, v in low_rank.items()}
    try:
        try:
            converted = WanLoraLoaderMixin.lora_state_dict(low_rank)
        except (KeyError, IndexError, ValueError):
            if layout != "lora_unet":
                raise
            # diffusers' musubi converter expects every layer of every block (with alphas); a partial
            # LoRA goes through its diffusion_model converter under the equivalent original names.
            converted = WanLoraLoaderMixin.lora_state_dict(
                {f"diffusion_model.{by_key[k][0]}.{by_key[k][2]}": v for k, v in low_rank.items()})
    except (KeyError, IndexError, ValueError) as e:
        raise LoraError(f"diffusers could not convert this LoRA ({type(e).__name__}: {e})") from e
    lora = {k.removeprefix("transformer."): v for k, v in converted.items()}
    got = {k.rsplit(".lora_", 1)[0] for k in lora}
    # anything the converter left out is reported, not lost
    unmatched += [key for key, (_, module, kind) in by_key.items() if module in has_factors and module not in got
                  and kind in _DOWN + _UP + ("alpha", "diff_b")]
    return {k: v for k, v in lora.items() if k.rsplit(".lora_", 1)[0] in targets}, diffs, unmatched


def _convert_diffusers_style(raw: dict, layout: str, targets: dict, transformer) -> tuple[dict, dict, list]:
    """diffusers / PEFT keys: strip the prefix, fold ``alpha`` (kohya convention) into ``lora_A``."""
    prefix = {"diffusers": "transformer.", "peft": "base_model.model.", "diffusers_bare": ""}[layout]
    lora, alphas, unmatched = {}, {}, []
    for key, value in raw.items():
        body = key[len(prefix):] if key.startswith(prefix) else None
        m = _DOTTED.match(body or "")
        if m is None or m["mod"] not in targets or m["kind"] not in ("lora_A.weight", "lora_B.weight", "lora_B.bias",
                                                                      "alpha"):
            unmatched.append(key)
        elif m["kind"] == "alpha":
            alphas[m["mod"]] = float(value)
        else:
            lora[f"{m['mod']}.{m['kind']}"] = value
    for module, alpha in alphas.items():
        a = lora.get(f"{module}.lora_A.weight")
        if a is not None:
            lora[f"{module}.lora_A.weight"] = a * (alpha / a.shape[0])
    return lora, {}, unmatched


def _check_shapes(weights: LoraWeights, targets: dict, transformer):
    for layer in weights.layers:
        a, b = weights.lora.get(f"{layer}.lora_A.weight"), weights.lora.get(f"{layer}.lora_B.weight")
        target = targets[layer]
        if a is None or b is None:
            raise LoraError(f"{weights.path}: layer {layer} has only one of the two LoRA factors")
        if a.shape[1] != target.in_features or b.shape[0] != target.out_features or a.shape[0] != b.shape[1]:
            raise LoraError(f"{weights.path}: LoRA for {layer} is [{b.shape[0]}x{b.shape[1]}]·[{a.shape[0]}x{a.shape[1]}] "
                            f"but the layer is {target.out_features}x{target.in_features}: the LoRA was made for "
                            f"another model (e.g. Wan 1.3B vs 14B, or T2V vs I2V)")
    for name, delta in weights.diffs.items():
        p = find_parameter(transformer, name)
        if p is None or tuple(p.shape) != tuple(delta.shape):
            raise LoraError(f"{weights.path}: delta for {name} has shape {tuple(delta.shape)}, the parameter "
                            f"{'does not exist' if p is None else tuple(p.shape)}")


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``FILE[:STRENGTH]`` (CLI ``--lora``) -> ``(path, strength)``; a Windows drive colon is kept.

    Raises:
        ValueError: an empty file name.
    """
    path, strength = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head and not tail.startswith(("\\", "/")):
        try:
            strength = float(tail)
            path = head
        except ValueError:
            pass
    if not path:
        raise ValueError(f"--lora '{text}': give FILE or FILE:STRENGTH")
    return path, strength

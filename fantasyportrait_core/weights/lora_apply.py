"""Applying Wan2.1 LoRAs (read by :mod:`fantasyportrait_core.weights.lora`) to our diffusers
transformer with strengths, and unloading them exactly.

Effect of a LoRA at strength ``s`` on a linear layer: ``W' = W + s·(alpha/rank)·B·A`` and bias
``b' = b + s·diff_b`` (Hu et al. 2021, LoRA, eq. 3; kohya's ``alpha`` convention). The delta is
applied at matmul time, not merged into ``W``: peft adapters for ``nn.Linear`` (and diffusers'
``GGUFLinear``) layers, a low-rank delta inside :class:`~fantasyportrait_core.model.fp8.ScaledFP8Linear`
for fp8 storage (merging would re-round every fp8 weight; ``benchmarks/bench_lora.py`` measures
both). So removing LoRAs restores every weight bit for bit: the base weights are never written,
and the few parameters patched with ``diff`` keys are restored from a copy.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from fantasyportrait_core.weights.lora import LoraError, LoraWeights, find_parameter, lora_targets

log = logging.getLogger("FantasyPortrait")


@dataclass
class _LoraState:
    """What is applied to one transformer (kept on it as ``_fp_lora``)."""

    active: list[tuple[str, float]] = field(default_factory=list)  # (weights key, strength) in order
    adapters: dict[str, str] = field(default_factory=dict)  # weights key -> peft adapter name
    backup: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter -> original value (CPU copy)
    counter: int = 0


def _state(transformer) -> _LoraState:
    state = transformer.__dict__.get("_fp_lora")
    if state is None:
        state = transformer.__dict__["_fp_lora"] = _LoraState()
    return state


def active_loras(transformer) -> list[tuple[str, float]]:
    """``[(file key, strength)]`` applied to ``transformer`` now, in order."""
    return list(_state(transformer).active)


def apply_loras(transformer: nn.Module, loras: Sequence[tuple[LoraWeights, float]]) -> None:
    """Make exactly ``loras`` (``(weights, strength)`` pairs, in order) active on ``transformer``.

    Idempotent and incremental: the same set at the same strengths does nothing; new strengths only
    rescale (``set_adapters``); files no longer wanted are removed. ``[]`` removes every LoRA and
    restores the transformer bit for bit. Strength 0 entries are skipped.

    Works the same with diffusers' block offload on or off, in either order: under group offload
    the hooks are taken off for the change and put back with the same options afterwards
    (:func:`~fantasyportrait_core.runtime.residency.offload_suspended`), since a streamed offload group
    onloads from the host copies it recorded when it was set up (new LoRA tensors would raise
    ``KeyError``, patched weights would be put back to their old values).

    Raises:
        LoraError: a LoRA whose layers or shapes do not fit this transformer.
    """
    from fantasyportrait_core.runtime.residency import offload_suspended

    wanted = [(w, float(s)) for w, s in loras if float(s) != 0.0]
    state = _state(transformer)
    signature = [(w.key, s) for w, s in wanted]
    if signature == state.active:
        return
    with offload_suspended(transformer):
        _apply(transformer, wanted, state, signature)


def _apply(transformer: nn.Module, wanted: list, state: _LoraState, signature: list) -> None:
    """The body of :func:`apply_loras` (hooks off)."""
    from fantasyportrait_core.model.fp8 import ScaledFP8Linear

    targets = lora_targets(transformer)
    keys = {w.key for w, _ in wanted}

    # peft adapters for plain linear (and GGUF) layers
    for key in [k for k in state.adapters if k not in keys]:
        transformer.delete_adapters(state.adapters.pop(key))
    for w, _ in wanted:
        if w.key in state.adapters:
            continue
        peft_part = {f"transformer.{k}": v for k, v in w.lora.items()
                     if not isinstance(targets[k.rsplit(".lora_", 1)[0]], ScaledFP8Linear)}
        if not peft_part:
            continue
        peft_part = _with_zero_biases(peft_part)
        state.counter += 1
        name = f"fp_lora_{state.counter}"
        with warnings.catch_warnings():  # peft warns on every adapter after the first
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            transformer.load_lora_adapter(peft_part, adapter_name=name, prefix="transformer")
        state.adapters[w.key] = name
    if state.adapters:
        strengths = {w.key: s for w, s in wanted}
        transformer.set_adapters(list(state.adapters.values()), [strengths[k] for k in state.adapters])
    elif any(hasattr(m, "base_layer") for m in transformer.modules()):
        transformer.unload_lora()  # no adapter left: remove the peft wrappers too

    # low-rank deltas inside fp8 linears, rebuilt for the wanted set
    for layer, module in targets.items():
        if isinstance(module, ScaledFP8Linear):
            factors = [(w.lora[f"{layer}.lora_A.weight"], w.lora[f"{layer}.lora_B.weight"],
                        w.lora.get(f"{layer}.lora_B.bias"), s) for w, s in wanted if f"{layer}.lora_A.weight" in w.lora]
            module.set_lora(factors)

    # full-parameter deltas, always computed from the saved original
    for name, original in list(state.backup.items()):
        p = find_parameter(transformer, name)
        p.data = original.to(p.device)
    touched = {}
    for w, s in wanted:
        for name, delta in w.diffs.items():
            touched.setdefault(name, []).append((delta, s))
    for name, deltas in touched.items():
        p = find_parameter(transformer, name)
        if name not in state.backup:
            state.backup[name] = p.detach().to("cpu", copy=True)
        original = state.backup[name]
        total = original.float() + sum(s * d.float() for d, s in deltas)
        p.data = total.to(device=p.device, dtype=original.dtype)
    for name in [n for n in state.backup if n not in touched]:
        del state.backup[name]
    state.active = signature
    if wanted:
        log.info("[FantasyPortrait] LoRAs active: %s", ", ".join(f"{w.name} @ {s:g}" for w, s in wanted))


def remove_loras(transformer: nn.Module) -> None:
    """Remove every LoRA: the transformer's weights are bit-identical to before the first one."""
    apply_loras(transformer, [])


def _with_zero_biases(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft gives every layer of an adapter a ``lora_B`` bias when any has one (``diff_b``); fill the
    others with zeros (their true value) instead of letting peft warn about missing keys."""
    if not any(k.endswith(".lora_B.bias") for k in sd):
        return sd
    out = dict(sd)
    for k, v in sd.items():
        if k.endswith(".lora_B.weight"):
            out.setdefault(k[: -len(".weight")] + ".bias", torch.zeros(v.shape[0], dtype=v.dtype))
    return out

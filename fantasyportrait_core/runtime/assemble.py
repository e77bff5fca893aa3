"""Speed options of a loaded transformer, set once per model for a device: the attention backend,
fp8 matmuls (fast mode) and regional ``torch.compile`` of the blocks.

One function, :func:`set_speed_options`, serves the CLI (:func:`~fantasyportrait_core.runtime.runner.prepare_model`)
and the ComfyUI Model Loader (``nodes/loaders.build_portrait_model``); the memory plan per job is
:func:`~fantasyportrait_core.runtime.memory.plan_sampling`, also shared.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field

import torch

from fantasyportrait_core.model.backends import set_attention_backend
from fantasyportrait_core.model.fp8 import ScaledFP8Linear, quantize_model_fp8, set_fp8_compute

log = logging.getLogger("FantasyPortrait")


def compile_available(device) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` (a one-line reason), or ``None`` when it can:
    on CUDA inductor needs Triton (``triton``, or ``triton-windows`` on Windows)."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs Triton (pip install triton; on Windows: pip install triton-windows)"
    return None


def weight_storage(transformer: torch.nn.Module) -> str:
    """``"fp8"`` when the blocks' linears are :class:`~fantasyportrait_core.model.fp8.ScaledFP8Linear`, else ``"bf16"``
    (weights in the compute dtype)."""
    return "fp8" if any(isinstance(m, ScaledFP8Linear) for m in transformer.modules()) else "bf16"


@dataclass
class SpeedOptions:
    """What :func:`set_speed_options` set on a transformer.

    Attributes:
        storage: ``"bf16"`` or ``"fp8"`` after the call (fast mode quantizes bf16 weights to fp8).
        fp8_compute: ``"upcast"`` or ``"scaled_mm"`` (fast mode where the device supports it).
        compiled: the blocks were compiled (diffusers ``compile_repeated_blocks``).
        notes: short human-readable notes for the model info / the CLI log.
    """

    storage: str
    fp8_compute: str = "upcast"
    compiled: bool = False
    notes: list[str] = field(default_factory=list)


def set_speed_options(transformer: torch.nn.Module, device, attention: str = "sdpa", fast: bool = False,
                      compile: bool = False) -> SpeedOptions:
    """Set the attention backend, fast mode and compilation of ``transformer`` for ``device``, in place.

    Args:
        transformer: the diffusers ``WanTransformer3DModel`` with the portrait processors attached.
        device: the device it will run on (fast mode and compilation depend on it).
        attention: a key of :data:`~fantasyportrait_core.model.backends.ATTENTION_BACKENDS`.
        fast: multiply the block linears in fp8 (``torch._scaled_mm``, GPUs of compute capability
            8.9+; elsewhere the fp8 weights are upcast to the compute dtype). bf16 weights are first
            stored as scaled fp8 (:func:`~fantasyportrait_core.model.fp8.quantize_model_fp8`).
        compile: ``torch.compile`` the repeated blocks; skipped with a warning where
            :func:`compile_available` says it cannot run.
    Returns:
        :class:`SpeedOptions`.
    Raises:
        ValueError: an unknown attention backend.
    """
    set_attention_backend(transformer, attention)
    storage = weight_storage(transformer)
    options = SpeedOptions(storage, notes=[f"attention {attention}"])
    if fast:
        if storage != "fp8":
            quantize_model_fp8(transformer)
            options.storage = "fp8"
        options.fp8_compute = set_fp8_compute(transformer, "scaled_mm", device)
        options.notes.append("fp8 matmul" if options.fp8_compute == "scaled_mm" else
                             f"fp8 matmul unavailable on {device} (needs a CUDA GPU of compute capability 8.9+): "
                             "bf16 matmul")
    if compile:
        why_not = compile_available(device)
        if why_not:
            log.warning("[FantasyPortrait] %s; running without it", why_not)
            options.notes.append("not compiled (no Triton)")
        else:
            transformer.compile_repeated_blocks()
            options.compiled = True
            options.notes.append("blocks compiled (the first run compiles: slower)")
    options.notes.insert(0, f"{options.storage} weights")
    return options

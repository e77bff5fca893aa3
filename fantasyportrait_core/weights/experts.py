"""Wan2.2-I2V-A14B's two experts (high-noise, low-noise): which file holds which, and loading both
strictly with :func:`~fantasyportrait_core.weights.load.load_transformer` (EXPERIMENTAL: the
FantasyPortrait adapter was trained on Wan2.1).

Expert layout and boundary: Wan-Video/Wan2.2 ``wan/configs/wan_i2v_A14B.py``; diffusers
``WanImageToVideoPipeline(transformer, transformer_2, boundary_ratio)``.
"""

from __future__ import annotations

import os

from fantasyportrait_core.weights.config import WAN22_I2V_EXPERT
from fantasyportrait_core.weights.files import CheckpointError
from fantasyportrait_core.weights.load import load_transformer


def _expert_hint(path: str) -> str | None:
    """"high" / "low" where a file or folder name says which expert it holds (Comfy-Org
    ``wan2.2_i2v_high_noise_14B_fp16``, GGUF ``Wan2.2-I2V-A14B-HighNoise-Q4_K_M``, diffusers
    ``transformer`` / ``transformer_2``), else ``None``."""
    parts = [p.lower().replace("-", "_") for p in os.path.normpath(os.fspath(path)).split(os.sep)[-2:]]
    name = "_".join(parts)
    if "high_noise" in name or "highnoise" in name:
        return "high"
    if "low_noise" in name or "lownoise" in name or parts[-1] == "transformer_2":
        return "low"
    if parts[-1] == "transformer":
        return "high"
    return None


def wan22_expert_paths(high, low=None) -> tuple:
    """The (high-noise, low-noise) checkpoints of Wan2.2-I2V-A14B.

    Args:
        high: the high-noise expert (file, shards, GGUF, diffusers ``transformer`` folder) or a
            diffusers pipeline folder holding ``transformer/`` (high noise) and ``transformer_2/``
            (low noise; Wan-AI/Wan2.2-I2V-A14B-Diffusers).
        low: the low-noise expert; ``None`` only with a pipeline folder.
    Raises:
        CheckpointError: one line for a single expert, the same file twice, or names saying the
            experts are swapped.
    """
    if low is None and isinstance(high, (str, os.PathLike)) and os.path.isdir(high):
        first, second = os.path.join(high, "transformer"), os.path.join(high, "transformer_2")
        if os.path.isdir(first) and os.path.isdir(second):
            return first, second
        if os.path.isdir(first):
            raise CheckpointError(f"{high}: has transformer/ but no transformer_2/: that is one model (Wan2.1 or a single "
                                  f"expert); Wan2.2-I2V-A14B needs both experts")
    if low is None:
        raise CheckpointError(f"{high}: one transformer given; Wan2.2-I2V-A14B needs two experts: the high-noise file as "
                              f"transformer and the low-noise file as second transformer")
    if isinstance(high, (str, os.PathLike)) and isinstance(low, (str, os.PathLike)) and \
            os.path.realpath(high) == os.path.realpath(low):
        raise CheckpointError(f"{high}: the same file for both experts; give the high-noise and the low-noise file")
    hints = (_expert_hint(high) if isinstance(high, (str, os.PathLike)) else None,
             _expert_hint(low) if isinstance(low, (str, os.PathLike)) else None)
    if hints == ("low", "high") or hints == ("low", "low") or hints == ("high", "high"):
        raise CheckpointError(f"the expert files look {'swapped' if hints == ('low', 'high') else 'alike'} "
                              f"({os.path.basename(os.fspath(high))} as high-noise, {os.path.basename(os.fspath(low))} as "
                              f"low-noise): the high-noise expert goes first (transformer), the low-noise one second")
    return high, low


def load_wan22_experts(high, low=None, **kwargs):
    """Both Wan2.2-I2V-A14B experts, each loaded strictly by :func:`load_transformer` with
    ``family=WAN22_I2V_EXPERT`` (any layout it reads: Comfy-Org repack fp16 / fp8_scaled, GGUF,
    diffusers ``transformer`` + ``transformer_2``; manifests in ``tests/data/wan22_i2v_a14b_*``).

    Experimental: the FantasyPortrait adapter was trained on Wan2.1; nobody has measured its quality
    on Wan2.2.

    Args:
        high, low: see :func:`wan22_expert_paths`.
        **kwargs: passed to :func:`load_transformer` (dtype, device, storage_dtype, num_heads).
    Returns:
        ``(high_noise_model, low_noise_model)``: diffusers ``WanTransformer3DModel`` without image branch.
    Raises:
        CheckpointError: a single expert, a Wan2.1 file where an expert is expected, experts of different
            sizes, or any load error of :func:`load_transformer`.
    """
    high, low = wan22_expert_paths(high, low)
    first = load_transformer(high, family=WAN22_I2V_EXPERT, **kwargs)
    second = load_transformer(low, family=WAN22_I2V_EXPERT, **kwargs)
    a, b = dict(first.config), dict(second.config)
    if any(a[k] != b[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim")):
        raise CheckpointError(f"the two experts differ in size ({a['num_layers']} vs {b['num_layers']} blocks, width "
                              f"{a['num_attention_heads'] * a['attention_head_dim']} vs "
                              f"{b['num_attention_heads'] * b['attention_head_dim']}): give both files of Wan2.2-I2V-A14B")
    return first, second

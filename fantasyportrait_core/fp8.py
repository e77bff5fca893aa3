"""Scaled fp8 weight storage for the transformer's linear layers.

A plain cast to ``float8_e4m3fn`` loses most of the precision of Wan's small weights (std ≈ 0.02
sits in e4m3's subnormal range, where only 1–3 mantissa bits remain). Scaled fp8 stores
``w / s`` in fp8 with one fp32 scale ``s = max|w| / 448`` per tensor (the "fp8 scaled" checkpoint
layout: ``scale_weight``), and multiplies the scale back when the weight is upcast for the matmul.
Weights from fp8-scaled files are kept exactly as stored.

LoRAs on these layers add a low-rank delta at matmul time (:class:`LowRankDelta`) instead of being
merged and re-quantised: the fp8 weight is never rewritten, so removing the LoRA is exact and the
LoRA itself keeps its bf16 precision (``benchmarks/bench_lora.py`` compares both).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled fp8: returns ``(q fp8, scale fp32 [])`` with ``q * scale ≈ weight``.

    Works in the weight's own dtype when it is bf16/fp16 (8+ mantissa bits, more than e4m3's 3),
    on the weight's device; the clamp matters because casts above 448 give NaN, not saturation.
    """
    w = weight if weight.dtype in (torch.bfloat16, torch.float16, torch.float32) else weight.float()
    scale = (w.abs().max().float() / FP8_MAX).clamp(min=1e-12)
    return (w / scale.to(w.dtype)).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


class ScaledFP8Linear(nn.Module):
    """``nn.Linear`` whose weight is fp8 e4m3 with a per-tensor fp32 ``scale``; computes in the
    input's dtype (bf16/fp16/fp32) by upcasting the weight for each call.

    Shapes: x ``[..., in_features]`` -> ``[..., out_features]``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device), requires_grad=False)
        self.register_buffer("scale", torch.ones((), dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False) \
            if bias else None
        self.compute_dtype = bias_dtype
        self.lora_delta: LowRankDelta | None = None  # LoRAs (fantasyportrait_core.lora), added after the matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.scale.to(x.dtype)
        out = F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        return out if self.lora_delta is None else out + self.lora_delta(x)

    def set_lora(self, factors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]]) -> None:
        """Apply LoRAs as a delta at matmul time; ``[]`` removes them (the fp8 weight is never touched).

        Args:
            factors: ``(A [r, in], B [out, r], bias [out] or None, strength)`` per LoRA, alpha/rank
                already folded into the factors.
        """
        self.lora_delta = LowRankDelta(factors, self.weight.device, self.compute_dtype) if factors else None


class LowRankDelta(nn.Module):
    """``Σ_i s_i·(B_i·A_i·x + b_i)`` for a linear layer, as one pair of matmuls: the LoRAs are stacked
    along the rank axis with each strength folded into its ``A`` (LoRA, Hu et al. 2021, eq. 3).

    Shapes: x ``[..., in]`` -> ``[..., out]``. Factors are kept in ``dtype`` (the layer's compute dtype)
    as non-persistent buffers, so they follow ``.to(device)`` and stay out of ``state_dict``.
    """

    def __init__(self, factors, device, dtype: torch.dtype):
        super().__init__()
        down = torch.cat([s * a.float() for a, _, _, s in factors]).to(device=device, dtype=dtype)
        up = torch.cat([b.float() for _, b, _, _ in factors], dim=1).to(device=device, dtype=dtype)
        biases = [s * bias.float() for _, _, bias, s in factors if bias is not None]
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)
        self.register_buffer("bias", sum(biases).to(device=device, dtype=dtype) if biases else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype), bias)


def fp8_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the ``nn.Linear`` layers inside the transformer blocks (≈ 99 % of the
    14B weights); embeddings, norms, modulation and the output head stay in the compute dtype."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("blocks.")]


def swap_in_fp8_linears(model: nn.Module, names: list[str], bias_dtype: torch.dtype) -> None:
    """Replace the named ``nn.Linear`` modules by :class:`ScaledFP8Linear` on the meta device."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        setattr(parent, child, ScaledFP8Linear(old.in_features, old.out_features, old.bias is not None,
                                               device="meta", bias_dtype=bias_dtype))

"""Scaled fp8 weight storage for the transformer's linear layers.

A plain cast to ``float8_e4m3fn`` loses most of the precision of Wan's small weights (std ≈ 0.02
sits in e4m3's subnormal range, where only 1–3 mantissa bits remain). Scaled fp8 stores
``w / s`` in fp8 with one fp32 scale ``s = max|w| / 448`` per tensor (the "fp8 scaled" checkpoint
layout: ``scale_weight``), and multiplies the scale back when the weight is upcast for the matmul.
Weights from fp8-scaled files are kept exactly as stored.

Fast mode (``compute="scaled_mm"``) multiplies in fp8 as well: the activation ``x`` gets one
dynamic per-tensor scale ``s_x = max|x| / 448`` per call (one reduction over ``x``), is quantised to
``x / s_x`` in e4m3, and ``torch._scaled_mm`` computes ``(x_q @ w_q^T) · s_x · s_w + bias`` with fp32
accumulation (FP8 formats for deep learning, Micikevicius et al. 2022, §4: per-tensor scaling).
That needs a GPU with fp8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell); elsewhere
the weight is upcast as above. ``compute="emulate"`` runs the same quantisation and the same scaled
product in fp32 on any device, so the CPU tests measure fast mode's error.

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
    scale = (w.abs().max().float() / FP8_MAX).clamp(min=min_scale(w.dtype))
    return (w / scale.to(w.dtype)).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def min_scale(dtype: torch.dtype) -> float:
    """Smallest per-tensor scale used in ``dtype``: its smallest normal number (fp16: 6.1e-5), at least
    1e-12. A scale that rounds to 0 in the dtype it is applied in (1e-12 is 0 in fp16) turns an
    all-zero tensor into 0/0 = NaN; a subnormal one loses its precision."""
    return max(1e-12, torch.finfo(dtype).tiny) if dtype.is_floating_point else 1e-12


FP8_COMPUTE = ("upcast", "scaled_mm", "emulate")


def scaled_mm_supported(device) -> bool:
    """Whether ``torch._scaled_mm`` runs on ``device``: a CUDA GPU of compute capability 8.9 or newer
    (fp8 tensor cores) and a torch that has the op."""
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor fp8 quantisation of an activation: ``(x_q e4m3, s_x fp32 [])`` with
    ``x_q · s_x ≈ x`` and ``s_x = max|x| / 448`` (rounded to ``x``'s dtype, so quantising and
    dequantising use the same value). Computed on ``x``'s device, in ``x``'s dtype."""
    scale = (x.abs().amax().float() / FP8_MAX).clamp(min=min_scale(x.dtype)).to(x.dtype)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale.float()


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               compute: str = "upcast") -> torch.Tensor:
    """``x @ (weight · scale)^T + bias`` for an fp8 e4m3 ``weight [out, in]`` with fp32 per-tensor
    ``scale``; ``x [..., in]`` (bf16/fp16/fp32) -> ``[..., out]`` in ``x``'s dtype.

    Args:
        compute: ``"upcast"`` — weight upcast to ``x``'s dtype, ordinary matmul (exact for the stored
            weight); ``"scaled_mm"`` — fp8 × fp8 ``torch._scaled_mm`` with a dynamic activation
            scale (:func:`quantize_activation`), for fp8 GPUs (:func:`set_fp8_compute` checks the
            device; recent torch also runs it on the CPU, slowly); feature sizes that are not
            multiples of 16 (the op's constraint) fall back to ``"upcast"``; the bias is fused into
            the op for bf16/fp16 compute and added after it for fp32 (the CUDA kernel refuses a
            bias with an fp32 output); ``"emulate"`` — the same
            quantisation and scaled product computed in fp32 (any device; for tests).
    """
    if compute == "scaled_mm" and x.shape[-1] % 16 == 0 and weight.shape[0] % 16 == 0:
        xq, sx = quantize_activation(x)
        # The CUDA kernel fuses a bias only into a bf16/fp16 output ("Bias is not supported when
        # out_dtype is set to Float32"; the bias must have the output's dtype); fp32 compute adds it
        # after the product instead.
        fused = bias is not None and x.dtype in (torch.bfloat16, torch.float16)
        out = torch._scaled_mm(xq.reshape(-1, xq.shape[-1]), weight.t(), scale_a=sx, scale_b=scale.float(),
                               bias=bias.to(x.dtype) if fused else None, out_dtype=x.dtype)
        if bias is not None and not fused:
            out = out + bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    if compute == "emulate":
        xq, sx = quantize_activation(x)
        out = (xq.float() @ weight.float().t()) * (sx * scale.float())
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)
    w = weight.to(x.dtype) * scale.to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


class ScaledFP8Linear(nn.Module):
    """``nn.Linear`` whose weight is fp8 e4m3 with a per-tensor fp32 ``scale``; computes in the
    input's dtype (bf16/fp16/fp32), by upcasting the weight (default) or, in fast mode, as an fp8
    matmul (:func:`fp8_linear`; ``compute`` is set by :func:`set_fp8_compute`).

    Shapes: x ``[..., in_features]`` -> ``[..., out_features]``.
    """

    compute = "upcast"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device), requires_grad=False)
        self.register_buffer("scale", torch.ones((), dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False) \
            if bias else None
        self.compute_dtype = bias_dtype
        self.lora_delta: LowRankDelta | None = None  # LoRAs (fantasyportrait_core.weights.lora), added after the matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = fp8_linear(x, self.weight, self.scale, self.bias, self.compute)
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


def set_fp8_compute(model: nn.Module, mode: str, device=None) -> str:
    """Set how every :class:`ScaledFP8Linear` of ``model`` multiplies.

    Args:
        mode: ``"upcast"``, ``"scaled_mm"`` (fast mode) or ``"emulate"`` (:func:`fp8_linear`).
        device: the device the model will run on; ``"scaled_mm"`` becomes ``"upcast"`` when
            :func:`scaled_mm_supported` says that device cannot run it.
    Returns:
        The mode actually set (``"upcast"`` when fast mode is not available there).
    Raises:
        ValueError: unknown mode, or ``model`` has no fp8 linears (fast mode needs fp8 storage).
    """
    if mode not in FP8_COMPUTE:
        raise ValueError(f"fp8 compute {mode!r} is unknown; choose one of {FP8_COMPUTE}")
    layers = [m for m in model.modules() if isinstance(m, ScaledFP8Linear)]
    if not layers and mode != "upcast":
        raise ValueError("fast mode needs fp8 weights: load the transformer with storage fp8_e4m3fn")
    if mode == "scaled_mm" and device is not None and not scaled_mm_supported(device):
        mode = "upcast"
    for m in layers:
        m.compute = mode
    return mode


@torch.no_grad()
def quantize_model_fp8(model: nn.Module) -> int:
    """Turn the blocks' ``nn.Linear`` layers of a loaded model into :class:`ScaledFP8Linear` in place
    (per-tensor scaled fp8, :func:`quantize_fp8`, on each weight's own device; biases keep their
    dtype). Layers already in fp8 are left as they are.

    Returns:
        The number of layers converted.
    """
    names = fp8_linear_names(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        q, scale = quantize_fp8(old.weight.data)
        new = ScaledFP8Linear(old.in_features, old.out_features, old.bias is not None, device="meta",
                              bias_dtype=old.weight.dtype)
        new.weight = nn.Parameter(q, requires_grad=False)
        new.scale = scale.to(q.device)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data, requires_grad=False)
        setattr(parent, child, new)
    return len(names)

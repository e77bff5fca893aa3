"""LoRA on scaled-fp8 linears: merge-and-requantise vs a low-rank delta at matmul time.

    python benchmarks/bench_lora.py                       # 14B layer sizes, CPU, a few hundred tokens
    python benchmarks/bench_lora.py --device cuda --tokens 21504 --dtype bf16   # 81 x 512² latent tokens
    python benchmarks/bench_lora.py --tiny --repeat 1     # smoke run of the script itself

For each Wan2.1-14B linear shape (5120x5120 attention, 13824x5120 / 5120x13824 FFN) and LoRA rank it
builds a random weight with Wan's scale (std 0.02), stores it as per-tensor scaled fp8
(``fantasyportrait_core.model.fp8.quantize_fp8``) and a random LoRA delta ``ΔW = B·A`` of a given size
relative to ``W``, then compares:

* ``delta``: ``ScaledFP8Linear`` + ``LowRankDelta`` (what ``fantasyportrait_core.weights.lora`` does): the fp8
  weight is untouched, the LoRA is applied in the compute dtype after the matmul;
* ``merge``: dequantise, add ΔW in the compute dtype, re-quantise to scaled fp8 (what a merge-into-
  the-weights loader does with fp8 storage);

by (a) the error of the effective LoRA change ``W_eff − W_fp8`` against the exact ΔW, (b) the error of
the layer output against ``x·(W_fp8 + ΔW)ᵀ`` in float64, (c) seconds per forward, (d) the one-off
merge time, and (e) what unloading needs: the delta path drops two small buffers and is exact, the
merge path must keep the original fp8 weight (1 byte per parameter) to restore it. Prints a
markdown table for docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fantasyportrait_core.model.fp8 import ScaledFP8Linear, quantize_fp8  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timed(fn, device, repeat):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat


def layer(out_f, in_f, q, scale, device, dtype):
    lin = ScaledFP8Linear(in_f, out_f, bias=True, device=device, bias_dtype=dtype)
    lin.weight.data, lin.scale.data = q.to(device), scale.to(device)
    lin.bias.data = torch.zeros(out_f, device=device, dtype=dtype)
    return lin


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_case(out_f, in_f, rank, ratio, tokens, device, dtype, repeat, g):
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    a = torch.randn(rank, in_f, generator=g)
    b = torch.randn(out_f, rank, generator=g)
    delta = b @ a
    delta *= ratio * w.norm() / delta.norm()  # ||ΔW|| = ratio·||W||
    a = a * (ratio * w.norm() / (b @ a).norm())
    q, s = quantize_fp8(w.to(dtype))
    w_fp8 = q.float() * s
    x = torch.randn(tokens, in_f, generator=g).to(device, dtype)
    exact = x.double() @ (w_fp8.double().to(device) + delta.double().to(device)).T

    lin = layer(out_f, in_f, q, s, device, dtype)
    base_s = timed(lambda: lin(x), device, repeat)
    lin.set_lora([(a, b, None, 1.0)])
    delta_s = timed(lambda: lin(x), device, repeat)
    eff_delta = (lin.lora_delta.up.double() @ lin.lora_delta.down.double()).cpu()
    out_delta = lin(x)

    t = time.perf_counter()
    q2, s2 = quantize_fp8((w_fp8.to(device, dtype) + delta.to(device, dtype)))
    if device.type == "cuda":
        torch.cuda.synchronize()
    merge_s = time.perf_counter() - t
    merged = layer(out_f, in_f, q2, s2, device, dtype)
    merged_s = timed(lambda: merged(x), device, repeat)
    eff_merge = q2.double().cpu() * s2.double().cpu() - w_fp8.double()
    out_merge = merged(x)
    return {
        "shape": f"{out_f}x{in_f}", "rank": rank, "ratio": ratio,
        "delta": (rel(eff_delta, delta), rel(out_delta, exact), delta_s, 0.0, "exact: drop 2 buffers"),
        "merge": (rel(eff_merge, delta), rel(out_merge, exact), merged_s, merge_s,
                  f"keep fp8 original: {out_f * in_f / 2**20:.0f} MiB"),
        "base_s": base_s,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--tokens", type=int, default=256, help="rows of x (81 frames at 512x512: 21504)")
    ap.add_argument("--ranks", default="64,128")
    ap.add_argument("--ratios", default="0.02,0.1", help="||ΔW|| / ||W|| of the random LoRA")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="small shapes (smoke run)")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    shapes = [(256, 256), (512, 256)] if args.tiny else [(5120, 5120), (13824, 5120), (5120, 13824)]
    g = torch.Generator().manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} threads visible)"
    print(f"device: {name}, compute {args.dtype}, {args.tokens} tokens, torch {torch.__version__}\n")
    print("| layer | rank | ‖ΔW‖/‖W‖ | method | LoRA-change error | output error | s/forward (no LoRA) | "
          "one-off merge s | unload |")
    print("|---|---|---|---|---|---|---|---|---|")
    for out_f, in_f in shapes:
        for rank in (int(r) for r in args.ranks.split(",")):
            for ratio in (float(r) for r in args.ratios.split(",")):
                r = run_case(out_f, in_f, rank, ratio, args.tokens, device, dtype, args.repeat, g)
                for method in ("delta", "merge"):
                    werr, oerr, sec, merge_s, unload = r[method]
                    print(f"| {r['shape']} | {rank} | {ratio:g} | {method} | {werr:.2e} | {oerr:.2e} | "
                          f"{sec:.4f} ({r['base_s']:.4f}) | {merge_s:.3f} | {unload} |")


if __name__ == "__main__":
    main()

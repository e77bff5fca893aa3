"""Transformer forward cost of the portrait branch vs. the bare diffusers Wan forward.

    python benchmarks/bench_forward.py                      # 14B I2V config, random bf16, CUDA
    python benchmarks/bench_forward.py --frames 81 --size 512x512 --people 1,2,4 --storage fp8
    python benchmarks/bench_forward.py --tiny --device cpu  # smoke run of the script itself

Builds a random Wan2.1-I2V transformer (no checkpoint needed), then times one forward for:
the bare diffusers processors; ours with no portrait condition (must match bare); ours with the
portrait branch for 1..N characters (masked when N > 1); and one full dual-guidance step
(3 passes: cfg > 1 and portrait cfg != 1). Prints a markdown table with seconds per forward/step
and peak GPU memory, plus the device name, to paste into docs/PERFORMANCE.md. Compare with the
bare-forward baseline in ../shared/reference/README.md (H100: 1.88 s at 81 × 512²).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fantasyportrait_core.adapter import latent_frames, window_length  # noqa: E402
from fantasyportrait_core.attention import PortraitCondition, attach_portrait_processors  # noqa: E402
from fantasyportrait_core.denoiser import I2VConditioning, PortraitDenoiser  # noqa: E402
from fantasyportrait_core.fp8 import FP8, fp8_linear_names, quantize_fp8, swap_in_fp8_linears  # noqa: E402
from fantasyportrait_core.masks import token_person_ids  # noqa: E402
from fantasyportrait_core.models import (TINY_ADAPTER, TINY_TRANSFORMER, WAN21_I2V_14B, build_adapter,  # noqa: E402
                                         build_transformer)


def timed(fn, device, repeat):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / repeat
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return dt, peak


def randomize(module, device, dtype):
    """Materialise a meta-built module directly on ``device`` with small random weights (a 14B model
    built in fp32 first would need 65 GB)."""
    g = torch.Generator(device).manual_seed(0)
    for name, p in list(module.named_parameters()):
        parent, _, leaf = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        data = torch.randn(p.shape, generator=g, device=device, dtype=dtype) * 0.02
        setattr(owner, leaf, torch.nn.Parameter(data, requires_grad=False))
    return module.to(device)


def to_scaled_fp8(model, dtype):
    """Random weights -> scaled fp8 storage, as the loader does."""
    names = fp8_linear_names(model)
    weights = {n: model.get_submodule(n) for n in names}
    old = {n: (m.weight.data, None if m.bias is None else m.bias.data) for n, m in weights.items()}
    swap_in_fp8_linears(model, names, bias_dtype=dtype)
    for n, (w, b) in old.items():
        m = model.get_submodule(n)
        q, s = quantize_fp8(w)
        m.weight = torch.nn.Parameter(q, requires_grad=False)
        m.scale = s
        if b is not None:
            m.bias = torch.nn.Parameter(b.to(dtype), requires_grad=False)


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--size", default="512x512", help="WxH in pixels")
    ap.add_argument("--people", default="1,2", help="character counts to time")
    ap.add_argument("--storage", choices=["bf16", "fp8"], default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny config (checks the script, numbers mean nothing)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    w, h = (int(v) for v in args.size.split("x"))
    cfg = TINY_TRANSFORMER if args.tiny else WAN21_I2V_14B
    torch.manual_seed(0)
    model = randomize(build_transformer(cfg, empty=True), device, dtype).eval()
    adapter = randomize(build_adapter(cfg, empty=True, **(TINY_ADAPTER if args.tiny else {})), device, dtype).eval()
    if args.storage == "fp8":
        to_scaled_fp8(model, dtype)
    f_lat = latent_frames(args.frames)
    x = torch.randn(1, 16, f_lat, h // 8, w // 8, device=device, dtype=dtype)
    y = torch.randn(1, 20, f_lat, h // 8, w // 8, device=device, dtype=dtype)
    text = torch.randn(1, 512, model.config.text_dim, device=device, dtype=dtype)
    img = torch.randn(1, 257, model.config.image_dim, device=device, dtype=dtype)
    tokens_per_frame = (h // 16) * (w // 16)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    rows = []

    def forward():
        return model(torch.cat([x, y], 1), torch.tensor([700.0], device=device), text,
                     encoder_hidden_states_image=img, return_dict=False)[0]

    rows.append(("bare diffusers forward", *timed(forward, device, args.repeat)))
    state = attach_portrait_processors(model, adapter)
    rows.append(("ours, no portrait", *timed(forward, device, args.repeat)))
    for n in (int(v) for v in args.people.split(",")):
        wl = window_length()
        windows = torch.randn(1, f_lat, n * wl, adapter.proj_dim, device=device, dtype=dtype)
        if n == 1:
            cond = PortraitCondition(windows)
        else:  # n vertical stripes of faces, background between them
            ids = torch.zeros(f_lat, h // 16, w // 16, dtype=torch.long, device=device)
            for p in range(n):
                ids[:, :, (2 * p + 1) * (w // 16) // (2 * n + 1):(2 * p + 2) * (w // 16) // (2 * n + 1)] = p + 1
            cond = PortraitCondition(windows, token_person_ids(n, wl).to(device), ids.reshape(f_lat, -1))
        state.condition = cond
        rows.append((f"ours, portrait, {n} character(s)", *timed(forward, device, args.repeat)))
        state.condition = None
    i2v = I2VConditioning(text[:, :20], text[:, :20], img, y)
    den = PortraitDenoiser(model, state, i2v, PortraitCondition(torch.randn(1, f_lat, 97, adapter.proj_dim,
                                                                           device=device, dtype=dtype)),
                           cfg=5.0, portrait_cfg=4.0)
    rows.append(("one dual-guidance step (3 passes)", *timed(lambda: den(x.float(), 0.7), device, 1)))

    print(f"\nDevice: {name}; {'tiny' if args.tiny else '14B I2V'} config, {args.storage} weights, "
          f"{args.frames} frames × {w}×{h} ({f_lat * tokens_per_frame} tokens), batch 1\n")
    print("| run | s | peak GiB |")
    print("|---|---|---|")
    for label, dt, peak in rows:
        print(f"| {label} | {dt:.3f} | {peak:.1f} |")


if __name__ == "__main__":
    main()

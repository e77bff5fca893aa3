"""Activation memory of one transformer forward, measured on the CPU, against the memory model.

    python benchmarks/bench_memory.py                      # 14B widths (1 block) and a dim-1536 model
    python benchmarks/bench_memory.py --tiny               # smoke run

The peak is read from PyTorch's own allocator records (``torch.profiler`` with ``profile_memory``:
the "Total Allocated" of every allocation event), so it counts exactly the tensors a forward keeps
alive, independent of the OS and of other processes. Weights are allocated before profiling and do
not count. For each model width it measures two token counts; the difference divided by the token
difference is the per-token activation cost (per-row constants cancel), printed beside the memory
model's ``activation_bytes`` (``fantasyportrait_core/runtime/memory.py``), and where in the forward the
peak happens (the op running when the allocator's total was highest).
The GPU's kernels differ (fused attention, cuBLAS workspaces), so the H100 peaks in
``../shared/reference/README.md`` are the model's main calibration; this is the second data point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fantasyportrait_core.runtime.memory import activation_bytes, measured_size  # noqa: E402
from fantasyportrait_core.model.build import TINY_TRANSFORMER, WAN21_I2V_14B, build_transformer  # noqa: E402

CONFIGS = {
    "14B widths, 1 block": dict(WAN21_I2V_14B, num_layers=1),
    "dim 1536, ffn 8960, 1 block": dict(WAN21_I2V_14B, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,
                                        num_layers=1, added_kv_proj_dim=1536),
}


def random_model(cfg, dtype):
    model = build_transformer(cfg, empty=True)
    g = torch.Generator().manual_seed(0)
    for name, p in list(model.named_parameters()):
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, torch.nn.Parameter(torch.randn(p.shape, generator=g, dtype=dtype) * 0.02,
                                                requires_grad=False))
    return model.eval()


def peak_bytes_of(fn) -> tuple[int, str]:
    """Peak of the CPU allocator's total allocated bytes during ``fn()``, above where it started,
    and the innermost op running at that moment."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.remove(path)
    mem = [e for e in events if e.get("name") == "[memory]"]
    if not mem:
        return 0, "?"
    start = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    top = max(mem, key=lambda e: e["args"]["Total Allocated"])
    ops = [e for e in events if e.get("ph") == "X" and e["ts"] <= top["ts"] <= e["ts"] + e.get("dur", 0)
           and e.get("name", "").startswith("aten::")]
    where = min(ops, key=lambda e: e.get("dur", 0))["name"] if ops else "?"
    return top["args"]["Total Allocated"] - start, where


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=2, help="latent frames")
    ap.add_argument("--sides", default="32,64", help="two latent sides (tokens = frames · (side/2)²)")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    dtype = torch.bfloat16
    configs = {"tiny": dict(TINY_TRANSFORMER, num_attention_heads=2, attention_head_dim=16, ffn_dim=64,
                            added_kv_proj_dim=32)} if args.tiny else CONFIGS
    s1, s2 = (int(v) for v in args.sides.split(","))
    print(f"\nCPU ({os.cpu_count()} cores), torch {torch.__version__}, bf16, batch 1, {args.frames} latent frames\n")
    print("| model | tokens | peak MiB | peak at | measured B/token | model B/token | model / measured |")
    print("|---|---|---|---|---|---|---|")
    for label, cfg in configs.items():
        model = random_model(cfg, dtype)
        size = measured_size(model)
        text = torch.randn(1, 512, cfg["text_dim"], dtype=dtype)
        img = torch.randn(1, 257, cfg["image_dim"], dtype=dtype)
        peaks = {}
        for side in (s1, s2):
            x = torch.randn(1, 36, args.frames, side, side, dtype=dtype)
            tokens = args.frames * (side // 2) ** 2
            with torch.no_grad():
                model(x, torch.full((1,), 500.0), text, encoder_hidden_states_image=img, return_dict=False)
                peaks[tokens] = peak_bytes_of(lambda: model(x, torch.full((1,), 500.0), text,
                                                            encoder_hidden_states_image=img, return_dict=False))
        (t1, (p1, w1)), (t2, (p2, w2)) = sorted(peaks.items())
        slope = (p2 - p1) / (t2 - t1)
        modeled = (activation_bytes(size, t2) - activation_bytes(size, t1)) / (t2 - t1)
        for t, p, where in ((t1, p1, w1), (t2, p2, w2)):
            print(f"| {label} | {t} | {p / 2**20:.1f} | {where} | {slope:,.0f} | {modeled:,.0f} | {modeled / slope:.2f} |",
                  flush=True)
        del model


if __name__ == "__main__":
    main()

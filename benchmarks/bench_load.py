"""Checkpoint loading: time and peak host memory of our streaming loader vs. a naive load.

    python benchmarks/bench_load.py [--layers 4] [--dtype bf16] [--device cpu|cuda] [--keep DIR]

Writes a random Wan2.1-I2V transformer at full 14B width (5120, 40 heads, ffn 13824) with
``--layers`` blocks (40 = the real 14B) in the original Wan key layout, then loads it in fresh
processes and prints a markdown table: seconds, peak RSS (VmHWM), anonymous RSS at the end, and GPU
peak when loading to CUDA. Rows: our loader (bf16, and fp8 storage) and the naive path
(``safetensors.load_file`` → state dict in RAM → ``WanTransformer3DModel(**config)`` →
``load_state_dict``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHILD = r'''
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import torch
mode, path, layers, device = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]

def status():
    out = {}
    for line in open("/proc/self/status"):
        k, v = line.split(":", 1)
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) / 2**20  # GiB
    return out

t0 = time.time()
if mode.startswith("ours"):
    from fantasyportrait_core.checkpoints import load_transformer
    storage = torch.float8_e4m3fn if mode == "ours_fp8" else None
    m = load_transformer(path, dtype=torch.bfloat16, device=device, storage_dtype=storage)
else:
    from safetensors.torch import load_file
    from fantasyportrait_core.checkpoints import wan_original_to_diffusers
    from fantasyportrait_core.models import WAN21_I2V_14B, build_transformer
    sd = {wan_original_to_diffusers(k): v for k, v in load_file(path).items()}
    m = build_transformer(dict(WAN21_I2V_14B, num_layers=layers)).to(torch.bfloat16)
    m.load_state_dict(sd)
    m.to(device)
    del sd
if device == "cuda":
    torch.cuda.synchronize()
dt = time.time() - t0
res = dict(mode=mode, seconds=dt, params=sum(p.numel() for p in m.parameters()), **status())
if device == "cuda":
    res["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
print(json.dumps(res))
'''


def write_checkpoint(path: str, layers: int):
    import torch
    from safetensors.torch import save_file

    from fantasyportrait_core.checkpoints import transformer_state_dict_original
    from fantasyportrait_core.models import WAN21_I2V_14B, build_transformer

    model = build_transformer(dict(WAN21_I2V_14B, num_layers=layers), empty=True)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in transformer_state_dict_original(model).items():
        sd[k] = (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16)
    save_file(sd, path)
    return os.path.getsize(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep", default=None, help="folder for the checkpoint (kept); default: a temp dir")
    ap.add_argument("--modes", default="ours,ours_fp8,naive")
    args = ap.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="fp_bench_")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"wan_i2v_{args.layers}layers_bf16.safetensors")
    if not os.path.exists(path):
        t = time.time()
        size = write_checkpoint(path, args.layers)
        print(f"wrote {path}: {size / 2**30:.2f} GiB in {time.time() - t:.1f} s", file=sys.stderr)
    size = os.path.getsize(path) / 2**30
    try:
        import torch

        device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    except Exception:
        device_name = args.device
    rows = []
    for mode in args.modes.split(","):
        out = subprocess.run([sys.executable, "-c", CHILD, ROOT, mode, path, str(args.layers), args.device],
                             capture_output=True, text=True)
        if out.returncode != 0:
            rows.append(f"| {mode} | failed: {out.stderr.strip().splitlines()[-1][:80]} | | | | |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        gpu = f"{r['gpu_peak_gib']:.2f}" if "gpu_peak_gib" in r else "–"
        rows.append(f"| {mode} | {r['seconds']:.1f} | {r['VmHWM']:.2f} | {r['RssAnon']:.2f} | {r['RssFile']:.2f} | {gpu} |")
    print(f"\nDevice: {device_name}; checkpoint: {args.layers} of 40 blocks at 14B width, bf16, "
          f"{size:.2f} GiB on disk, original Wan keys\n")
    print("| loader | s | peak RSS GiB | anon RSS GiB (end) | file RSS GiB (end) | GPU peak GiB |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if not args.keep:
        os.remove(path)
        os.rmdir(folder)


if __name__ == "__main__":
    main()

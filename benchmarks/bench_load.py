"""Checkpoint loading: time and peak host / GPU memory of our streaming loader vs. a naive load.

    python benchmarks/bench_load.py [--layers 4] [--formats bf16,fp8_scaled] [--device cpu|cuda]
                                    [--modes ours,ours_fp8,naive] [--forward] [--keep DIR]

Writes a random Wan2.1-I2V transformer at full 14B width (5120, 40 heads, ffn 13824) with
``--layers`` blocks (40 = the real 14B) in two published layouts, shard by shard (so the 30.5 GiB
bf16 checkpoint can be written on a machine with less RAM than that):

- ``bf16``: original Wan keys in ~4 GiB shards + ``diffusion_pytorch_model.safetensors.index.json``
  (the layout of the official Wan2.1-I2V-14B-720P release);
- ``fp8_scaled``: ``model.diffusion_model.`` keys, fp8 e4m3 block weights with per-tensor
  ``scale_weight`` and the ``scaled_fp8`` marker (the Comfy-Org "fp8 scaled" layout).

Each loader then runs in a fresh process and the script prints a markdown table: load seconds; peak,
anonymous and file-backed (page cache, reclaimable) RSS right after the load; GPU peak when loading
to CUDA; and with ``--forward`` the seconds of one forward on a small latent (proves every weight
is real and usable) and the peak RSS after it (the forward pages in memory-mapped weights). Loaders: ``ours`` (bf16 compute
and storage), ``ours_fp8`` (scaled fp8 storage, bf16 compute) and ``naive`` (bf16 only:
``safetensors.load_file`` → state dict in RAM → ``WanTransformer3DModel(**config)`` →
``load_state_dict``; it needs ~2× the checkpoint in RAM, so it is skipped when that exceeds the
machine's memory).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
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
mode, path, layers, device, forward, tiny = (sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5],
                                            sys.argv[6] == "1", sys.argv[7] == "1")

def status():
    out = {}
    for line in open("/proc/self/status"):
        k, v = line.split(":", 1)
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) / 2**20  # GiB
    return out

t0 = time.time()
if mode.startswith("ours"):
    from fantasyportrait_core.weights.load import load_transformer
    storage = torch.float8_e4m3fn if mode == "ours_fp8" else None
    m = load_transformer(path, dtype=torch.bfloat16, device=device, storage_dtype=storage)
else:
    from safetensors.torch import load_file
    from fantasyportrait_core.weights.files import TensorSource
    from fantasyportrait_core.weights.keys import wan_original_to_diffusers
    from fantasyportrait_core.model.build import TINY_TRANSFORMER, WAN21_I2V_14B, build_transformer
    sd = {}
    for f in TensorSource(path).paths:
        sd.update({wan_original_to_diffusers(k): v for k, v in load_file(f).items()})
    m = build_transformer(dict(TINY_TRANSFORMER if tiny else WAN21_I2V_14B, num_layers=layers)).to(torch.bfloat16)
    m.load_state_dict(sd)
    m.to(device)
    del sd
if device == "cuda":
    torch.cuda.synchronize()
res = dict(mode=mode, seconds=time.time() - t0, params=sum(p.numel() for p in m.parameters()))
if device == "cuda":
    res["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    res["gpu_alloc_gib"] = torch.cuda.memory_allocated() / 2**30
res["load"] = status()  # VmHWM here = peak during the load
if forward:  # 1 latent frame of 16x16 (64 tokens): weight traffic dominates
    c = m.config
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, c.in_channels, 1, 16, 16, generator=g, device=device, dtype=torch.bfloat16)
    text = torch.randn(1, 512, c.text_dim, generator=g, device=device, dtype=torch.bfloat16)
    img = torch.randn(1, 257, c.image_dim, generator=g, device=device, dtype=torch.bfloat16)
    t1 = time.time()
    with torch.no_grad():
        out = m(x, torch.tensor([700.0], device=device), text, encoder_hidden_states_image=img, return_dict=False)[0]
    if device == "cuda":
        torch.cuda.synchronize()
    res["forward_s"] = time.time() - t1
    res["forward_finite"] = bool(torch.isfinite(out).all())
    res["after_forward"] = status()
print(json.dumps(res))
'''

SHARD_BYTES = 4 * 2**30


def _shard_groups(shapes: dict[str, tuple], bytes_per_element: int, shard_bytes: int) -> list[list[str]]:
    """Keys in checkpoint order, cut into groups of about ``shard_bytes`` (never splitting a block)."""
    def block_of(k):
        return int(k.split(".")[1]) if k.startswith("blocks.") else -1

    keys = sorted(shapes, key=lambda k: (block_of(k), k))
    groups, size = [[]], 0
    for k in keys:
        n = bytes_per_element * math.prod(shapes[k])
        if size + n > shard_bytes and groups[-1] and block_of(k) != block_of(groups[-1][-1]):
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    return groups


def write_checkpoint(folder: str, layers: int, fmt: str, config: dict | None = None,
                     shard_bytes: int = SHARD_BYTES) -> float:
    """Random checkpoint (default: 14B width) in ``fmt`` ("bf16" | "fp8_scaled") as shards + index json.

    Holds one shard (~4 GiB, plus safetensors' serialisation copy) in RAM at a time. Returns GiB on disk.
    """
    import torch
    from safetensors.torch import save_file

    from fantasyportrait_core.weights.keys import COMFY_PREFIX, transformer_state_dict_original
    from fantasyportrait_core.model.fp8 import quantize_fp8
    from fantasyportrait_core.model.build import WAN21_I2V_14B, build_transformer

    model = build_transformer(dict(config or WAN21_I2V_14B, num_layers=layers), empty=True)
    shapes = {k: tuple(v.shape) for k, v in transformer_state_dict_original(model).items()}
    prefix = COMFY_PREFIX if fmt == "fp8_scaled" else ""
    groups = _shard_groups(shapes, 1 if fmt == "fp8_scaled" else 2, shard_bytes)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, keys in enumerate(groups):
        sd = {}
        for k in keys:
            w = torch.empty(shapes[k], dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
            if fmt == "fp8_scaled" and w.ndim == 2 and k.startswith("blocks."):
                q, scale = quantize_fp8(w)
                sd[prefix + k], sd[prefix + k[: -len(".weight")] + ".scale_weight"] = q, scale.reshape(1)
            else:
                sd[prefix + k] = w
        if fmt == "fp8_scaled" and i == 0:
            sd[prefix + "scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(sd, os.path.join(folder, name))
        weight_map.update({k: name for k in sd})
        total += os.path.getsize(os.path.join(folder, name))
        del sd
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total / 2**30


def _mem_total_gib() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 2**20


def _host_ram_needed(fmt: str, mode: str, size_gib: float, device: str) -> float:
    """Anonymous host RAM a loader needs (GiB), to skip runs the OOM killer would end: the naive
    path holds the state dict and the model; ours needs RAM only for a model that changes dtype on
    the CPU (weights kept in the file's dtype stay memory-mapped, page cache)."""
    if mode == "naive":
        return 2.2 * size_gib
    if device != "cpu":
        return 0.0
    if fmt == "bf16" and mode == "ours_fp8":
        return size_gib / 2
    if fmt == "fp8_scaled" and mode == "ours":
        return size_gib * 2
    return 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--formats", default="bf16,fp8_scaled")
    ap.add_argument("--modes", default="ours,ours_fp8,naive")
    ap.add_argument("--forward", action="store_true", help="also time one small forward after loading")
    ap.add_argument("--keep", default=None, help="folder for the checkpoints (kept); default: a temp dir")
    ap.add_argument("--shard-mib", type=float, default=SHARD_BYTES / 2**20, help="target shard size")
    ap.add_argument("--tiny", action="store_true", help="tiny config (checks the script, numbers mean nothing)")
    args = ap.parse_args()
    from fantasyportrait_core.model.build import TINY_TRANSFORMER

    root = args.keep or tempfile.mkdtemp(prefix="fp_bench_")
    try:
        import torch

        device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
        versions = f"torch {torch.__version__}"
    except Exception:
        device_name, versions = args.device, ""
    rows, sizes = [], {}
    for fmt in args.formats.split(","):
        folder = os.path.join(root, f"wan_i2v_{args.layers}layers_{fmt}")
        index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
        if not os.path.exists(index):
            os.makedirs(folder, exist_ok=True)
            t = time.time()
            size = write_checkpoint(folder, args.layers, fmt, TINY_TRANSFORMER if args.tiny else None,
                                    int(args.shard_mib * 2**20))
            print(f"wrote {folder}: {size:.2f} GiB in {time.time() - t:.1f} s", file=sys.stderr)
        sizes[fmt] = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**30
        for mode in args.modes.split(","):
            if mode == "naive" and fmt != "bf16":
                continue
            need = _host_ram_needed(fmt, mode, sizes[fmt], args.device)
            if need > 0.9 * _mem_total_gib():
                rows.append(f"| {fmt} | {mode} | skipped: needs ~{need:.0f} GiB RAM, "
                            f"machine has {_mem_total_gib():.0f} | | | | | | |")
                continue
            print(f"loading {fmt} with {mode} ...", file=sys.stderr)
            out = subprocess.run([sys.executable, "-c", CHILD, ROOT, mode, folder, str(args.layers), args.device,
                                  "1" if args.forward else "0", "1" if args.tiny else "0"],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                why = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1][:80]
                rows.append(f"| {fmt} | {mode} | failed: {why} | | | | | | |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            gpu = f"{r['gpu_peak_gib']:.2f}" if "gpu_peak_gib" in r else "–"
            load = r["load"]
            fwd = (f"{r['forward_s']:.1f}{'' if r['forward_finite'] else ' (non-finite!)'} | "
                   f"{r['after_forward']['VmHWM']:.2f}") if "forward_s" in r else "– | –"
            rows.append(f"| {fmt} | {mode} | {r['seconds']:.1f} | {load['VmHWM']:.2f} | {load['RssAnon']:.2f} | "
                        f"{load['RssFile']:.2f} | {gpu} | {fwd} |")
    print(f"\nDevice: {device_name}, {_mem_total_gib():.0f} GiB RAM, {versions}; random Wan2.1-I2V checkpoint, "
          f"{args.layers} of 40 blocks at {'tiny' if args.tiny else '14B'} width; on disk: "
          + ", ".join(f"{fmt} {s:.2f} GiB" for fmt, s in sizes.items()) + "\n")
    print("| checkpoint | loader | load s | peak RSS GiB | anon RSS GiB | file RSS GiB | GPU peak GiB | "
          "forward s | peak RSS after forward GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

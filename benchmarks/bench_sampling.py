"""Everyday sampling modes end to end: 30-step UniPC vs the 4-step lightx2v LoRA mode.

    python benchmarks/bench_sampling.py                 # one full tiny-model video per mode, CPU
    python benchmarks/bench_sampling.py --full-size --device cuda --frames 81 --size 512x512 [--storage fp8]

Default (CPU, no checkpoints): the CLI pipeline (``fantasyportrait_core.runtime.runner.run_job``: face detection,
expression encoding, VAE, sampling, MP4) on ``../shared/data/man.jpeg`` + ``jgz.mp4`` with the tiny
random model, once per mode: ``sampler=unipc, steps=30`` (reference guidance: portrait cfg 4,
2 transformer passes per step) and a tiny lightx2v-layout LoRA with ``preset=lightx2v`` (4 steps;
same portrait cfg). Prints sampling seconds, whole-video seconds and their ratios.

``--full-size``: the Wan2.1-I2V-14B transformer with random weights (bf16, or scaled fp8 storage) and
a random rank-64 LoRA in lightx2v's layout on one GPU, synthetic text/CLIP/expression conditions at
``--frames`` x ``--size``; times the sampling loop of both modes (the part the modes change).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fantasyportrait_core.runtime.job import Job, MemoryOptions, SamplingOptions  # noqa: E402
from fantasyportrait_core.weights.lora import read_lora  # noqa: E402
from fantasyportrait_core.weights.lora_apply import apply_loras, remove_loras  # noqa: E402
from fantasyportrait_core.runtime.runner import run_job, tiny_random_models  # noqa: E402
from fantasyportrait_core.weights.tiny import write_wan_lora  # noqa: E402

MODES = {"unipc 30 steps": SamplingOptions(sampler="unipc", steps=30),
         "lightx2v LoRA, 4 steps": SamplingOptions(preset="lightx2v")}  # tiny-video mode


def tiny_video(args):
    data = args.data
    models = tiny_random_models(0)
    out_dir = tempfile.mkdtemp(prefix="bench_sampling_")
    lora = os.path.join(out_dir, "tiny_lightx2v.safetensors")
    write_wan_lora(models.transformer, lora, lightx2v=True, rank=8)
    rows = {}
    for name, sampling in MODES.items():
        job = Job(image=os.path.join(data, "man.jpeg"), driving=[os.path.join(data, "jgz.mp4")],
                  out=os.path.join(out_dir, "out.mp4"), frames=args.frames, max_size=args.max_size,
                  sampling=sampling, memory=MemoryOptions(device=args.device), tiny_random=True)
        remove_loras(models.transformer)
        if sampling.preset:
            apply_loras(models.transformer, [(read_lora(lora, models.transformer), 1.0)])
        best = None
        for _ in range(args.repeat):
            cpu = time.process_time()
            report = run_job(job, models)  # validates; the driving video as a stream of only the frames used
            report.update(total_cpu_s=time.process_time() - cpu)
            if best is None or report["total_cpu_s"] < best["total_cpu_s"]:
                best = report
        rows[name] = best
    print(f"tiny random model, {best['frames']} frames {best['width']}x{best['height']}, device {args.device}, "
          f"best of {args.repeat}, torch {torch.__version__}\n")
    print("| mode | transformer passes | sampling CPU s (wall s) | whole video CPU s (wall s) |")
    print("|---|---|---|---|")
    passes = {"unipc 30 steps": 30 * 2, "lightx2v LoRA, 4 steps": 4 * 2}
    for name, r in rows.items():
        print(f"| {name} | {passes[name]} | {r['sampling_cpu_s']:.2f} ({r['sampling_s']:.2f}) | "
              f"{r['total_cpu_s']:.2f} ({r['total_s']:.2f}) |")
    a, b = rows["unipc 30 steps"], rows["lightx2v LoRA, 4 steps"]
    print(f"\nratio (unipc 30 / lightx2v 4), CPU seconds: sampling {a['sampling_cpu_s'] / max(b['sampling_cpu_s'], 1e-9):.1f}x, "
          f"whole video {a['total_cpu_s'] / b['total_cpu_s']:.2f}x")
    print(json.dumps({k: {key: round(v[key], 2) for key in ("sampling_s", "sampling_cpu_s", "total_s", "total_cpu_s")}
                      for k, v in rows.items()}))


def full_size(args):
    from fantasyportrait_core.model.geometry import latent_frames
    from fantasyportrait_core.model.attention import PortraitCondition, attach_portrait_processors
    from fantasyportrait_core.model.denoiser import I2VConditioning
    from fantasyportrait_core.model.fp8 import fp8_linear_names, quantize_fp8, swap_in_fp8_linears
    from fantasyportrait_core.model.build import TINY_ADAPTER, TINY_TRANSFORMER, WAN21_I2V_14B, build_adapter, build_transformer
    from fantasyportrait_core.sampling.generate import generate_latent

    device = torch.device(args.device)
    width, height = (int(v) for v in args.size.split("x"))
    cfg = dict(TINY_TRANSFORMER if args.tiny else WAN21_I2V_14B, num_layers=args.layers)
    g = torch.Generator(device).manual_seed(0)
    tr = build_transformer(cfg, empty=True)
    fp8 = set()
    if args.storage == "fp8":
        names = fp8_linear_names(tr)
        swap_in_fp8_linears(tr, names, torch.bfloat16)
        fp8 = {n + ".weight" for n in names}
    sd = {}
    for name, p in tr.state_dict().items():
        t = torch.randn(p.shape, generator=g, device=device, dtype=torch.bfloat16) * 0.02
        if name in fp8:
            q, s = quantize_fp8(t)
            sd[name], sd[name[: -len(".weight")] + ".scale"] = q, s
        elif not name.endswith(".scale"):
            sd[name] = t
    tr.load_state_dict(sd, strict=False, assign=True)
    tr = tr.to(device).eval().requires_grad_(False)
    del sd
    adapter = build_adapter(cfg, **(TINY_ADAPTER if args.tiny else {})).to(device).eval()
    state = attach_portrait_processors(tr, adapter)
    f_lat = latent_frames(args.frames)
    h, w = height // 8, width // 8
    gc = torch.Generator().manual_seed(1)
    cond = I2VConditioning(torch.randn(1, 64, cfg["text_dim"], generator=gc), None,
                           torch.randn(1, 257, cfg["image_dim"], generator=gc),
                           torch.randn(1, 20, f_lat, h, w, generator=gc))
    portrait = PortraitCondition(torch.randn(1, f_lat, 97, adapter.proj_dim, generator=gc).to(device))
    lora_path = os.path.join(tempfile.mkdtemp(prefix="bench_lora_"), "lightx2v_rank64.safetensors")
    write_wan_lora(tr, lora_path, lightx2v=True, rank=64, blocks=tuple(range(args.layers)))
    lora = read_lora(lora_path, tr)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    model = "tiny" if args.tiny else "14B"
    print(f"{name}: Wan2.1-I2V-{model} ({args.layers} blocks, random {args.storage} weights), {args.frames} frames "
          f"{width}x{height}, portrait cfg 4 (2 passes per step)\n")
    print("| mode | steps | sampling s | peak GiB |")
    print("|---|---|---|---|")
    times = {}
    for mode, kw, loras in ((f"unipc {args.steps} steps", dict(sampler="unipc", steps=args.steps), []),
                            ("lightx2v LoRA, 4 steps", dict(preset="lightx2v"), [(lora, 1.0)])):
        apply_loras(tr, loras)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        generate_latent(tr, state, cond, portrait, args.frames, width, height, portrait_cfg=4.0, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[mode] = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        print(f"| {mode} | {args.steps if 'unipc' in mode else 4} | {times[mode]:.1f} | {peak:.1f} |")
    a, b = times.values()
    print(f"\nratio: {a / b:.1f}x")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--max-size", type=int, default=320)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--full-size", action="store_true", help="random 14B transformer (GPU), sampling loop only")
    ap.add_argument("--size", default="512x512", help="--full-size: WIDTHxHEIGHT")
    ap.add_argument("--layers", type=int, default=40, help="--full-size: transformer blocks (40 = 14B)")
    ap.add_argument("--steps", type=int, default=30, help="--full-size: UniPC steps to compare with")
    ap.add_argument("--storage", choices=("bf16", "fp8"), default="bf16")
    ap.add_argument("--tiny", action="store_true", help="--full-size with the tiny config (smoke run of the script)")
    args = ap.parse_args(argv)
    (full_size if args.full_size else tiny_video)(args)


if __name__ == "__main__":
    main()

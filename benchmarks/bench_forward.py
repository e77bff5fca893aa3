"""Speed and memory of the 14B transformer forward: bare diffusers vs ours, bf16 vs fast mode, the
portrait branch for 1 and 2 characters, a full dual-guidance step, and the low-VRAM plans.

    python benchmarks/bench_forward.py --sizes 512x512             # A, B, C at 512² (~4 min on an H100/H200)
    python benchmarks/bench_forward.py --sizes 1280x720 --phases A # one phase at 720p per call
    python benchmarks/bench_forward.py --tiny --device cpu         # smoke run of the script (numbers mean nothing)

``benchmarks/run_gpu.sh`` runs it as separate steps, most important rows first, each well inside
one 10-minute device call. One run prints one markdown table (rows appear as they finish, so a
run cut short still shows the rows done) with, per row: seconds per forward (or per step), latent
tokens per second, model FLOPs of the forward, MFU against a bf16 matmul measured in the same run,
the peak GPU memory, and what the memory model (:mod:`fantasyportrait_core.runtime.memory`) predicted.

Phases (``--phases``, in this order), all on one randomly initialised Wan2.1-I2V-14B (no
checkpoint needed):

A. bf16 weights resident, for each size: the bare diffusers forward (diffusers' own processors),
   ours without portrait (must cost the same), ours with the portrait branch for each character
   count, and one full guidance step (cfg 5, portrait cfg 4: 3 passes batched into one forward;
   at the first size also the same step with the passes one by one).
B. Fast mode: block linears quantised in place to scaled fp8 and multiplied by ``torch._scaled_mm``
   (GPUs of compute capability 8.9+), blocks compiled (``compile_repeated_blocks``: diffusers'
   defaults, i.e. ``fullgraph=False``), per size: the portrait forward for the largest character
   count, and the guidance step.
C. Low-VRAM plan: fp8 weights (and the adapter's K/V) moved to the host and streamed block by
   block (:func:`~fantasyportrait_core.runtime.residency.enable_block_offload`: side CUDA stream, recorded
   streams), one guidance pass per forward; per size the portrait forward through the product's
   own path (``PortraitDenoiser`` with the conditions on the CPU, compute device resolved as the
   sampler resolves it, not prepared on the GPU by this script), with its time relative to the
   bf16 resident forward of phase A (when A ran in the same call), and at the first size one
   guidance step with its passes one by one (the plan's ``batch_passes = 1``).

The error columns of B and C compare with the bf16 portrait forward on the same inputs; when A is
not in ``--phases``, that reference forward is run once per size before quantising.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

from fantasyportrait_core.model.adapter import window_length  # noqa: E402
from fantasyportrait_core.model.geometry import latent_frames  # noqa: E402
from fantasyportrait_core.model.attention import PortraitCondition, attach_portrait_processors  # noqa: E402
from fantasyportrait_core.model.denoiser import I2VConditioning, PortraitDenoiser  # noqa: E402
from fantasyportrait_core.model.fp8 import quantize_model_fp8, set_fp8_compute  # noqa: E402
from fantasyportrait_core.faces.regions import token_person_ids  # noqa: E402
from fantasyportrait_core.runtime.memory import GIB, measured_size, peak_bytes, tokens_per_forward  # noqa: E402
from fantasyportrait_core.runtime.residency import available_ram_bytes, enable_block_offload  # noqa: E402
from fantasyportrait_core.model.build import (TINY_ADAPTER, TINY_TRANSFORMER, WAN21_I2V_14B, build_adapter,  # noqa: E402
                                         build_transformer)

CONTEXT = 512 + 257


def forward_flops(cfg: dict, tokens: int, rows: int = 1, people: int = 0, proj_dim: int = 2048, f_lat: int = 21) -> float:
    """Model FLOPs of one transformer forward (multiply-adds × 2), counted from the shapes.

    Per block and latent token: the linears of self-attention (4 d²), cross-attention query and
    output (2 d²) and FFN (2 d f); self-attention scores and values (2 · 2 L d, L = tokens); text +
    image cross-attention (2 · 2 · 769 · d); the portrait branch (2 · 2 · 97 N · d). Per block and
    row, once: the K/V projections of the 769 context tokens (4 · 769 d²) and of the expression
    windows (4 · F_lat · 97 N · proj · d). Patch embedding and head are < 0.1 % and left out.
    """
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    f = cfg["ffn_dim"]
    lk = window_length() * people
    per_token = 2 * (6 * d * d + 2 * d * f) + 4 * tokens * d + 4 * CONTEXT * d + 4 * lk * d
    per_row = 2 * 2 * CONTEXT * d * d + (2 * 2 * f_lat * lk * proj_dim * d if people else 0)
    return float(cfg["num_layers"] * rows * (tokens * per_token + per_row))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int):
    """(seconds per call: the best of ``repeat`` timed calls, peak GiB) after one warm-up call."""
    fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    dt = min(times)
    peak = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else float("nan")
    return dt, peak


def matmul_tflops(device, dtype, n: int) -> float:
    """bf16 (or the run's dtype) matmul throughput of this device, measured now."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps = 10 if device.type == "cuda" else 2
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


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


class Table:
    """Markdown rows printed as they come (flushed), kept for the summary."""

    HEAD = ("| run | size | s | tokens/s | TFLOP | MFU | peak GiB | model GiB | vs bare | rel. err vs bf16 |\n"
            "|---|---|---|---|---|---|---|---|---|---|")

    def __init__(self, peak_tflops: float):
        self.peak = peak_tflops
        self.rows = []
        self.bare = {}
        print(self.HEAD, flush=True)

    def add(self, label, size, dt, peak_gib, tokens, flops, predicted=None, ratio_to=None, err=None):
        mfu = flops / dt / (self.peak * 1e12)
        if label.startswith("bare"):
            self.bare[size] = dt
        ref = ratio_to if ratio_to is not None else self.bare.get(size)
        ratio = f"{dt / ref:.2f}×" if ref else "–"
        pred = "–" if predicted is None else f"{predicted / GIB:.1f}"
        row = (f"| {label} | {size} | {dt:.3f} | {tokens / dt:,.0f} | {flops / 1e12:.3g} | {100 * mfu:.0f} % | "
               f"{peak_gib:.1f} | {pred} | {ratio} | {'–' if err is None else f'{100 * err:.2f} %'} |")
        self.rows.append(row)
        print(row, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512x512,1280x720", help="comma-separated WxH")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--people", default="1,2", help="character counts for the portrait rows")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=1, help="timed calls per row (after one warm-up)")
    ap.add_argument("--phases", default="A,B,C", help="phases to run: any of A (bf16 resident), B (fast mode), "
                                                          "C (fp8 + block offload)")
    ap.add_argument("--skip", default="", help="rows to skip: any of fast,offload,step")
    ap.add_argument("--no-compile", action="store_true", help="fast mode without torch.compile")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; "
                                                              "aot_eager on the CPU)")
    ap.add_argument("--tiny", action="store_true", help="tiny config (checks the script, numbers mean nothing)")
    ap.add_argument("--medium", action="store_true", help="dim 1536 (12 heads), ffn 8960, 2 blocks: CPU ratios")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = dict(TINY_TRANSFORMER, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, added_kv_proj_dim=32) \
        if args.tiny else WAN21_I2V_14B
    if args.medium:
        cfg = dict(WAN21_I2V_14B, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=2,
                   added_kv_proj_dim=1536)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    people = [int(v) for v in args.people.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    phases = {p.strip().upper() for p in args.phases.split(",") if p.strip()}
    if "B" not in phases:
        skip.add("fast")
    if "C" not in phases:
        skip.add("offload")
    backend = args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    t_start = time.perf_counter()
    torch.manual_seed(0)

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    peak_tflops = matmul_tflops(device, dtype, 8192 if device.type == "cuda" else 1024)
    wdt = "bf16" if dtype == torch.bfloat16 else "fp32"
    config_name = "tiny" if args.tiny else "medium (dim 1536, 2 blocks)" if args.medium else "Wan2.1-I2V-14B"
    print(f"\nDevice: {name}; torch {torch.__version__}; {config_name} config, random "
          f"weights, {args.frames} frames, batch 1 unless stated; {str(dtype).split('.')[-1]} matmul measured now: "
          f"{peak_tflops:.1f} TFLOP/s (MFU is against this)\n", flush=True)

    model = randomize(build_transformer(cfg, empty=True), device, dtype).eval()
    adapter = randomize(build_adapter(cfg, empty=True, **(TINY_ADAPTER if args.tiny else {})), device, dtype).eval()
    proj = adapter.proj_dim
    table = Table(peak_tflops)
    f_lat = latent_frames(args.frames)
    g = torch.Generator(device).manual_seed(1)

    cache = {}

    def inputs(w, h):
        """The same latent, text and image tokens for a size in every phase (errors compare them)."""
        if (w, h) not in cache:
            cache[(w, h)] = (torch.randn(1, 36, f_lat, h // 8, w // 8, device=device, dtype=dtype, generator=g),
                             torch.randn(1, 512, cfg["text_dim"], device=device, dtype=dtype, generator=g),
                             torch.randn(1, 257, cfg["image_dim"], device=device, dtype=dtype, generator=g))
        return cache[(w, h)]

    def condition(n, w, h):
        key = ("cond", n, w, h)
        if key not in cache:
            cache[key] = torch.randn(1, f_lat, n * window_length(), proj, device=device, dtype=dtype, generator=g)
        windows = cache[key]
        if n == 1:
            return PortraitCondition(windows)
        ids = torch.zeros(f_lat, h // 16, w // 16, dtype=torch.long, device=device)  # n vertical face stripes
        for p in range(n):
            ids[:, :, (2 * p + 1) * (w // 16) // (2 * n + 1):(2 * p + 2) * (w // 16) // (2 * n + 1)] = p + 1
        return PortraitCondition(windows, token_person_ids(n, window_length()).to(device), ids.reshape(f_lat, -1))

    def forward_fn(x, text, img):
        t = torch.full((x.shape[0],), 700.0, device=device)
        return lambda: model(x, t, text, encoder_hidden_states_image=img, return_dict=False)[0]

    def step_fn(state, w, h, n, batch_passes=None):
        x, text, img = inputs(w, h)
        g_cpu = torch.Generator().manual_seed(2)
        i2v = I2VConditioning(text[:, :20].cpu(), text[:, 20:40].cpu(), img.cpu(), torch.randn(1, 20, f_lat, h // 8, w // 8, generator=g_cpu))
        den = PortraitDenoiser(model, state, i2v, condition(n, w, h), cfg=5.0, portrait_cfg=4.0,
                               batch_passes=batch_passes)
        return lambda: den(x[:, :16].float(), 0.7)

    n_max = max(people)
    resident_2p, reference = {}, {}

    def rel_err(out, w, h):
        ref = reference.get((w, h))
        return None if ref is None else ((out.float().cpu() - ref).norm() / ref.norm()).item()

    with torch.no_grad():
        # ---- A: bf16 resident
        base = measured_size(model, adapter)
        state = attach_portrait_processors(model, adapter)
        for w, h in sizes if "A" not in phases else ():  # B/C alone: their error reference, once per size
            state.condition = condition(n_max, w, h).prepared(device, dtype, rows=1)
            reference[(w, h)] = forward_fn(*inputs(w, h))().float().cpu()
            state.condition = None
        for w, h in sizes if "A" in phases else ():
            label = f"{w}×{h}×{args.frames}"
            tokens = tokens_per_forward(w, h, args.frames)
            x, text, img = inputs(w, h)
            model.set_attn_processor(WanAttnProcessor())
            dt, pk = timed(forward_fn(x, text, img), device, args.repeat)
            pred = peak_bytes(base, "bf16", "none", tokens, 1, 0, 1) - base.adapter_kv_bytes
            table.add(f"bare diffusers forward, {wdt}", label, dt, pk, tokens, forward_flops(cfg, tokens, f_lat=f_lat), pred)
            state = attach_portrait_processors(model, adapter)
            if (w, h) == sizes[0]:
                dt, pk = timed(forward_fn(x, text, img), device, args.repeat)
                table.add(f"ours, no portrait, {wdt}", label, dt, pk, tokens, forward_flops(cfg, tokens, f_lat=f_lat))
            for n in people:
                state.condition = condition(n, w, h).prepared(device, dtype, rows=1)
                dt, pk = timed(forward_fn(x, text, img), device, args.repeat)
                if n == n_max:
                    reference[(w, h)] = forward_fn(x, text, img)().float().cpu()
                state.condition = None
                table.add(f"ours, portrait, {n} character(s), {wdt}", label, dt, pk, tokens,
                          forward_flops(cfg, tokens, 1, n, proj, f_lat), peak_bytes(base, "bf16", "none", tokens, 1, 1, n))
                if n == n_max:
                    resident_2p[(w, h)] = dt
            if "step" not in skip:
                dt, pk = timed(step_fn(state, w, h, n_max), device, 1)
                table.add(f"one guidance step, 3 passes batched, {n_max} char., {wdt}", label, dt, pk, 3 * tokens,
                          forward_flops(cfg, tokens, 3, n_max, proj, f_lat), peak_bytes(base, "bf16", "none", tokens, 3, 1, n_max))
                if (w, h) == sizes[0]:
                    dt, pk = timed(step_fn(state, w, h, n_max, batch_passes=1), device, 1)
                    table.add(f"one guidance step, 3 passes one by one, {n_max} char., {wdt}", label, dt, pk,
                              3 * tokens, forward_flops(cfg, tokens, 3, n_max, proj, f_lat),
                              peak_bytes(base, "bf16", "none", tokens, 1, 1, n_max))
        if "A" in phases:
            print(f"<!-- phase A done at {time.perf_counter() - t_start:.0f} s -->", flush=True)

        # ---- B: fast mode (fp8 matmul + torch.compile)
        if "fast" not in skip:
            quantize_model_fp8(model)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # the CPU run forces the real torch._scaled_mm (slow there) so its error column is fast mode's
            compute = set_fp8_compute(model, "scaled_mm", device if device.type == "cuda" else None)
            compiled = not args.no_compile
            if compiled:
                model.compile_repeated_blocks(backend=backend)
            fast = f"fast ({'fp8 matmul' if compute == 'scaled_mm' else 'fp8 storage, bf16 matmul'}" \
                   f"{', compiled' if compiled else ''})"
            fp8size = measured_size(model, adapter)
            for w, h in sizes:
                label = f"{w}×{h}×{args.frames}"
                tokens = tokens_per_forward(w, h, args.frames)
                x, text, img = inputs(w, h)
                state.condition = condition(n_max, w, h).prepared(device, dtype, rows=1)
                t0 = time.perf_counter()
                fn = forward_fn(x, text, img)
                err = rel_err(fn(), w, h)  # compile happens here; timed() warms up again
                sync(device)
                compile_s = time.perf_counter() - t0
                dt, pk = timed(fn, device, args.repeat)
                state.condition = None
                table.add(f"ours, portrait, {n_max} char., {fast}; first call {compile_s:.0f} s", label, dt, pk,
                          tokens, forward_flops(cfg, tokens, 1, n_max, proj, f_lat),
                          peak_bytes(fp8size, "fp8", "none", tokens, 1, 1, n_max), err=err)
                if "step" not in skip:
                    dt, pk = timed(step_fn(state, w, h, n_max), device, 1)
                    table.add(f"one guidance step, 3 passes batched, {n_max} char., {fast}", label, dt, pk,
                              3 * tokens, forward_flops(cfg, tokens, 3, n_max, proj, f_lat),
                              peak_bytes(fp8size, "fp8", "none", tokens, 3, 1, n_max))
            for block in model.blocks:  # back to eager for phase C
                block._compiled_call_impl = None
            torch._dynamo.reset()
            print(f"<!-- phase B done at {time.perf_counter() - t_start:.0f} s -->", flush=True)

        # ---- C: low-VRAM plan: fp8 storage, block offload (with the adapter K/V) on a side stream, 1 pass/forward
        if "offload" not in skip:
            if "fast" in skip:
                quantize_model_fp8(model)
            set_fp8_compute(model, "upcast")
            lowsize = measured_size(model, adapter)
            model.to("cpu")
            for i in range(adapter.num_layers):
                for m in adapter.kv_projections(i):
                    m.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            pinned = enable_block_offload(model, device, available_ram_bytes(), adapter=adapter)
            host = ("all blocks pinned up front" if pinned else "blocks pinned as they stream") \
                if device.type == "cuda" else "no CUDA streams"
            for w, h in sizes:
                label = f"{w}×{h}×{args.frames}"
                tokens = tokens_per_forward(w, h, args.frames)
                x, text, img = inputs(w, h)
                # The product's path: conditions on the CPU, the denoiser resolves the compute device
                # as the sampler does (under offload: the hook's onload device) and prepares the
                # portrait condition there; same inputs as the bf16 reference (timestep 700 = sigma 0.7).
                c = condition(n_max, w, h)
                cond_cpu = PortraitCondition(c.windows.cpu(), None if c.token_person is None else c.token_person.cpu(),
                                             None if c.latent_person is None else c.latent_person.cpu())
                i2v = I2VConditioning(text.cpu(), None, img.cpu(), x[:, 16:].cpu())
                den = PortraitDenoiser(model, state, i2v, cond_cpu, cfg=1.0, portrait_cfg=4.0)
                fn = lambda den=den, x=x: den.velocity(x[:, :16], 0.7, "positive", True)  # noqa: E731
                err = rel_err(fn(), w, h)
                dt, pk = timed(fn, device, args.repeat)
                table.add(f"low-VRAM plan: fp8 + block offload ({host}), {n_max} char. (vs resident)", label,
                          dt, pk, tokens, forward_flops(cfg, tokens, 1, n_max, proj, f_lat),
                          peak_bytes(lowsize, "fp8", "block", tokens, 1, 1, n_max),
                          ratio_to=resident_2p.get((w, h)), err=err)
                if "step" not in skip and (w, h) == sizes[0]:
                    dt, pk = timed(step_fn(state, w, h, n_max, batch_passes=1), device, 1)
                    table.add(f"low-VRAM plan: one guidance step, 3 passes one by one, {n_max} char.", label, dt,
                              pk, 3 * tokens, forward_flops(cfg, tokens, 3, n_max, proj, f_lat),
                              peak_bytes(lowsize, "fp8", "block", tokens, 1, 1, n_max))
            print(f"<!-- phase C done at {time.perf_counter() - t_start:.0f} s -->", flush=True)

    print(f"\nTotal {time.perf_counter() - t_start:.0f} s. 'model GiB': the memory model's prediction with its "
          f"reserve (fantasyportrait_core/runtime/memory.py); 'vs bare': time relative to the bare diffusers forward of the "
          f"same size (low-VRAM rows: to the bf16 resident portrait forward). MFU counts forward_flops() against "
          f"the matmul rate above (fp8 rows too).", flush=True)


if __name__ == "__main__":
    main()

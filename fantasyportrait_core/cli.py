"""Standalone command line: animate a portrait with one or several driving videos.

    python -m fantasyportrait_core.cli demo --data ../shared/data --out outputs/demo
    python -m fantasyportrait_core.cli run --image ref.png --driving a.mp4 [b.mp4 ...] --out out.mp4 \\
        --wan-dir Wan2.1-I2V-14B-720P-Diffusers --adapter fantasyportrait_model.ckpt --pd-fpg pd_fpg.pth

Few-step and styled sampling (any run):

    ... --lora lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors --preset lightx2v
    ... --lora style.safetensors:0.7 --sampler unipc --steps 20 --portrait-cfg-end 0.5
    ... --transformer wan2.1-i2v-14b-480p-Q4_K_M.gguf

``run`` without checkpoint paths (or with ``--tiny-random``) builds a tiny randomly initialised
model: the pipeline runs end to end, but the pixels are not a real animation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time

import numpy as np
import torch

from . import pipeline as P
from .attention import ATTENTION_BACKENDS, attach_portrait_processors, set_attention_backend
from .denoiser import I2VConditioning
from .models import DTYPES
from .detectors import BACKENDS, make_detector
from .preview import draw_faces
from .video import Video, probe_video, read_image, read_video, resample_fps, write_video

log = logging.getLogger("FantasyPortrait")



def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fantasyportrait", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--frames", type=int, default=81,
                       help="max frames to generate (floored to 4k+1); more than --context-frames uses context windows")
        p.add_argument("--max-size", type=int, default=720, help="longest side of the output, rounded up to /16")
        p.add_argument("--steps", type=int, default=30)
        p.add_argument("--cfg", type=float, default=1.0, help="text guidance (1 = off, as the reference scripts)")
        p.add_argument("--portrait-cfg", type=float, default=4.0, help="portrait guidance (<= 1 = off, as the reference)")
        p.add_argument("--portrait-scale", type=float, default=1.0, help="portrait branch strength in the DiT")
        p.add_argument("--shift", type=float, default=5.0)
        p.add_argument("--seed", type=int, default=42)
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--detector", choices=BACKENDS, default="mtcnn",
                       help="face detector: mtcnn (offline), mediapipe, insightface, official (ONNX pair)")
        p.add_argument("--detector-dir", default=None,
                       help="insightface root (holding models/buffalo_l) or folder with face_det.onnx + face_landmark.onnx")
        p.add_argument("--smooth", type=float, default=0.0, help="landmark smoothing sigma in frames (0 = off)")
        p.add_argument("--context-frames", type=int, default=81,
                       help="longer videos are denoised in overlapping windows of this many frames")
        p.add_argument("--context-overlap", type=int, default=16, help="frames shared by neighbouring windows")
        _sampling_options(p)
        p.add_argument("--fast", action="store_true",
                       help="fast mode: fp8 weights multiplied in fp8 (torch._scaled_mm) on GPUs of compute capability "
                            "8.9+ (others: bf16 matmul); implies --fp8")
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the transformer blocks (needs Triton on CUDA; the first step compiles)")
        p.add_argument("--attention", choices=list(ATTENTION_BACKENDS), default="sdpa",
                       help="attention kernels: sdpa (PyTorch picks cuDNN/flash), sdpa_cudnn, sdpa_flash, sageattention")
        p.add_argument("--offload", choices=["auto", "none", "block"], default="auto",
                       help="block: stream transformer blocks from RAM to the GPU; auto: from the memory plan")

    demo = sub.add_parser("demo", help="tiny random model on the shared inputs (one and two characters)")
    demo.add_argument("--data", default=os.path.join("..", "shared", "data"))
    demo.add_argument("--out", default=os.path.join("outputs", "demo"))
    common(demo)
    demo.set_defaults(frames=33, max_size=320, steps=8)

    run = sub.add_parser("run", help="animate one reference image")
    run.add_argument("--image", required=True)
    run.add_argument("--driving", nargs="+", required=True,
                     help="one video per character, characters ordered left to right in the image; "
                          "or one video showing all characters")
    run.add_argument("--out", required=True, help="output .mp4 (a _faces.png preview is written beside it)")
    run.add_argument("--prompt", default="")
    run.add_argument("--negative-prompt", default=None)
    run.add_argument("--people", type=int, default=None,
                     help="characters in a single driving video (default: one per video)")
    run.add_argument("--assign", choices=P.ASSIGN_MODES, default="left_to_right",
                     help="which reference face each character animates")
    run.add_argument("--face-order", default="", help="explicit face index per character, e.g. 1,0 (overrides --assign)")
    run.add_argument("--fps", type=float, default=None,
                     help="frame rate of the output; driving videos are resampled to it (default: the first video's)")
    run.add_argument("--transformer", help="Wan2.1-I2V transformer: file, shards, folder or .gguf (any supported format)")
    run.add_argument("--wan-dir", help="diffusers Wan2.1-I2V folder (VAE, umT5, CLIP; transformer if not given)")
    run.add_argument("--adapter", help="fantasyportrait_model.ckpt or the repacked .safetensors")
    run.add_argument("--pd-fpg", help="pd_fpg.pth (default: the pd_fpg.* keys of a repacked adapter)")
    run.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    run.add_argument("--fp8", action="store_true", help="store transformer weights in fp8 (bf16 compute)")
    run.add_argument("--tiny-random", action="store_true", help="use a tiny random model (no checkpoints)")
    run.add_argument("--init-video", default=None,
                     help="video to start from when --denoise < 1 (video-to-video; resized to the output size)")
    common(run)
    return ap


def _sampling_options(p):
    """LoRAs, sampler, schedule, denoise and guidance interval (fantasyportrait_core.sampling / .lora)."""
    from .sampling import PRESETS, SAMPLERS

    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="Wan2.1 LoRA (any published layout), strength 1 by default; repeat for several")
    p.add_argument("--sampler", choices=SAMPLERS, default="euler",
                   help="euler (reference), unipc (Wan's default solver), dpmpp_2m, dpmpp_2m_sde, lcm")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="lightx2v: 4 steps at timesteps 1000/750/500/250, shift 5, lcm, cfg 1 (for lightx2v's "
                        "step-distill LoRA); overrides --steps/--shift/--sampler/--cfg")
    p.add_argument("--sigmas", default=None, help="explicit comma-separated sigmas from 1 to 0 (overrides steps/shift)")
    p.add_argument("--denoise", type=float, default=1.0, help="start below full noise (needs --init-video)")
    p.add_argument("--cfg-start", type=float, default=0.0, help="text cfg from this fraction of the steps on")
    p.add_argument("--cfg-end", type=float, default=1.0, help="text cfg up to this fraction of the steps")
    p.add_argument("--portrait-cfg-start", type=float, default=0.0, help="portrait cfg from this fraction of the steps")
    p.add_argument("--portrait-cfg-end", type=float, default=1.0, help="portrait cfg up to this fraction of the steps")
    p.add_argument("--portrait-scale-steps", default="",
                   help="portrait scale per step range, e.g. '0-0.5:1.2,0.5-1:0.8' (fractions of the steps)")


def sampling_kwargs(args) -> dict:
    """The sampling options of ``args`` as :func:`~fantasyportrait_core.pipeline.generate_latent` keywords.

    Raises:
        ValueError: naming the option, for unparsable sigmas or step ranges.
    """
    from .sampling import parse_step_ranges

    sigmas = None
    if getattr(args, "sigmas", None):
        try:
            sigmas = [float(v) for v in args.sigmas.replace(" ", "").split(",") if v]
        except ValueError:
            raise ValueError(f"--sigmas '{args.sigmas}' must be comma-separated numbers like 1,0.9375,0.8333,0.625,0") from None
    return dict(sampler=args.sampler, preset=args.preset, sigmas=sigmas, denoise=args.denoise,
                cfg_range=(args.cfg_start, args.cfg_end), portrait_cfg_range=(args.portrait_cfg_start, args.portrait_cfg_end),
                portrait_scales=parse_step_ranges(args.portrait_scale_steps, "--portrait-scale-steps"))


def check_sampling_args(args) -> None:
    """Early, one-line errors for the sampling options (before any model is loaded or video read).

    Raises:
        ValueError: bad sigmas, step ranges or guidance ranges, an unreadable --lora spec, or a
            schedule starting below full noise without --init-video.
    """
    from .lora import parse_lora_arg
    from .sampling import GuidanceSchedule, schedule_sigmas

    kw = sampling_kwargs(args)
    schedule = schedule_sigmas(args.steps, args.shift, kw["denoise"], kw["sigmas"], kw["preset"])
    GuidanceSchedule(schedule, args.cfg, args.portrait_cfg, kw["cfg_range"], kw["portrait_cfg_range"],
                     kw["portrait_scales"])
    if float(schedule[0]) < 1.0 and not getattr(args, "init_video", None):
        raise ValueError(f"the schedule starts at sigma {float(schedule[0]):.4f} < 1 (--denoise {args.denoise} or "
                         f"--sigmas): give --init-video to start from, or use --denoise 1")
    for spec in args.lora:
        path, _ = parse_lora_arg(spec)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--lora {spec}: file not found: {path}")


def apply_cli_loras(transformer, specs: list[str]) -> list:
    """Read and apply ``--lora FILE[:STRENGTH]`` arguments; returns the summaries for the report."""
    from .lora import apply_loras, parse_lora_arg, read_lora

    loras = []
    for spec in specs:
        path, strength = parse_lora_arg(spec)
        loras.append((read_lora(path, transformer), strength))
    apply_loras(transformer, loras)
    return [{"lora": w.name, "strength": s, "summary": w.summary(), "unmatched_keys": len(w.unmatched)}
            for w, s in loras]


@torch.no_grad()
def init_latent_from_video(vae, path: str, num_frames: int, width: int, height: int) -> torch.Tensor:
    """Normalised VAE latent ``[1, 16, F_lat, H/8, W/8]`` of the first ``num_frames`` frames of a video,
    resized to the output size: what ``--denoise < 1`` starts from.

    Raises:
        ValueError: the video has fewer frames than will be generated.
    """
    from .models import normalize_latent

    video = read_video(path, max_frames=num_frames)
    if len(video.frames) < num_frames:
        raise ValueError(f"--init-video {path} has {len(video.frames)} frames; {num_frames} are generated")
    frames = np.stack([P.resize_image(f, width, height) for f in video.frames])
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    p = next(vae.parameters())
    return normalize_latent(vae.encode(x.to(p.device, p.dtype)).latent_dist.mode().float()).cpu()


class Models:
    """Everything one generation needs; ``random`` tells the output to say the weights are random."""

    def __init__(self, transformer, adapter, vae, encoder, conditioners=None, random=False):
        self.transformer, self.adapter, self.vae, self.encoder = transformer, adapter, vae, encoder
        self.conditioners, self.random = conditioners, random
        self.state = attach_portrait_processors(transformer, adapter)


def tiny_random_models(seed: int = 0) -> Models:
    from .models import random_tiny_models

    return Models(*random_tiny_models(seed), random=True)


def real_models(args) -> Models:
    from diffusers import AutoencoderKLWan

    from .checkpoints import load_adapter, load_expression_encoder, load_transformer
    from .encoders import WanConditioners

    if not args.wan_dir or not args.adapter:
        raise SystemExit("real-model mode needs --wan-dir and --adapter (or use --tiny-random)")
    dtype = DTYPES[args.dtype]
    transformer = load_transformer(args.transformer or os.path.join(args.wan_dir, "transformer"), dtype=dtype,
                                   device="cpu", storage_dtype=torch.float8_e4m3fn if args.fp8 or args.fast else None)
    adapter = load_adapter(args.adapter, dtype=dtype)
    encoder = load_expression_encoder(args.pd_fpg or args.adapter)
    vae = AutoencoderKLWan.from_pretrained(os.path.join(args.wan_dir, "vae"), torch_dtype=torch.float32).eval()
    return Models(transformer, adapter, vae, encoder, WanConditioners(args.wan_dir, dtype, args.device))


def animate(models: Models, image: np.ndarray, videos: list, out_path: str, args, people: int | None = None,
            prompt: str = "", negative_prompt: str | None = None) -> dict:
    """Run the whole pipeline for one reference image; write ``out_path`` and ``*_faces.png``.

    Returns:
        A report dict (faces found, frames filled, sizes, timings) that is also printed.
    """
    import cv2

    t0 = time.time()
    device = args.device
    detector = make_detector(args.detector, args.detector_dir)
    report = {"output": out_path, "random_weights": models.random, "sampler": args.preset or args.sampler}
    try:
        # Driving side: one track per video, or `people` tracks from a single video.
        drivers = []
        with P.on_device(models.encoder, device):
            if people and people > 1 and len(videos) == 1:
                drivers = P.encode_driving(detector, models.encoder, videos[0].frames, people=people, smooth=args.smooth)
            else:
                for v in videos:
                    drivers += P.encode_driving(detector, models.encoder, v.frames, people=1, smooth=args.smooth)
        report["driving"] = [{"video": os.path.basename(videos[min(i, len(videos) - 1)].path or "?"),
                              "frames": int(d.num_frames), "frames_without_face": d.track.missing}
                             for i, d in enumerate(drivers)]
        num_frames = P.frames_for(drivers, args.frames)

        # Reference side.
        width, height = P.generation_size(image.shape[1], image.shape[0], args.max_size)
        ref = P.resize_image(image, width, height)
        faces = detector.detect(ref)
        report["reference_faces"] = [{"box": [round(float(v), 1) for v in f.box], "score": round(f.score, 3)}
                                     for f in faces]
        order = P.parse_face_order(getattr(args, "face_order", ""), "--face-order")
        chosen = P.assign_faces(faces, len(drivers), order, getattr(args, "assign", "left_to_right"),
                                [P.driver_embedding(d) for d in drivers])
        layout = P.reference_layout(chosen, drivers, width, height, num_frames)
    finally:
        detector.close()

    portrait = P.portrait_condition(models.adapter.to(device), drivers, num_frames, layout, args.portrait_scale)
    preview = draw_faces(ref, layout.faces, layout.regions, layout.latent_person if len(drivers) > 1 else None,
                         [f"#{i} <- {r['video']}" for i, r in enumerate(report["driving"])])
    preview_path = os.path.splitext(out_path)[0] + "_faces.png"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    cv2.imwrite(preview_path, cv2.cvtColor(preview, cv2.COLOR_RGB2BGR))

    # Conditions: text + CLIP image (real encoders) or seeded stand-ins (random tiny model).
    with P.on_device(models.vae, device):
        y = P.encode_reference_latent(models.vae, ref, num_frames)
    cfg_t = models.transformer.config
    if models.conditioners is not None:
        from .encoders import DEFAULT_NEGATIVE_PROMPT

        text_pos = models.conditioners.text(prompt)
        text_neg = models.conditioners.text(DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt) \
            if args.cfg != 1.0 else None
        image_ctx = models.conditioners.image(ref)
    else:
        g = torch.Generator().manual_seed(args.seed)
        text_pos = torch.randn(1, 16, cfg_t.text_dim, generator=g)
        text_neg = torch.randn(1, 16, cfg_t.text_dim, generator=g)
        image_ctx = torch.randn(1, 257, cfg_t.image_dim, generator=g)
    cond = I2VConditioning(text_pos, text_neg, image_ctx, y)

    sampling = sampling_kwargs(args)
    init = None
    if getattr(args, "init_video", None):
        with P.on_device(models.vae, device):
            init = init_latent_from_video(models.vae, args.init_video, num_frames, width, height)
    t1 = time.time()
    plan = speed_and_memory(models, args, width, height, num_frames, len(drivers))
    report["memory_plan"] = plan.describe()
    placed = contextlib.nullcontext() if plan.offload == "block" else P.on_device(models.transformer, device)
    with placed:
        latent = P.generate_latent(models.transformer, models.state, cond, portrait, num_frames, width, height,
                                   steps=args.steps, seed=args.seed, cfg=args.cfg, portrait_cfg=args.portrait_cfg,
                                   shift=args.shift, context_frames=args.context_frames,
                                   context_overlap=args.context_overlap, init_latent=init, **sampling,
                                   batch_passes=plan.batch_passes)
    t2 = time.time()
    with P.on_device(models.vae, device):
        frames = P.decode_latent(models.vae, latent)
    fps = videos[0].fps
    write_video(out_path, frames, fps, audio_from=videos[0].path)
    written = probe_video(out_path)  # check what a player will see, not what we meant to write
    if (written["frames"], written["width"], written["height"]) != (num_frames, width, height):
        raise RuntimeError(f"{out_path}: wrote {written} but expected {num_frames} frames {width}x{height}")
    report.update(frames=written["frames"], width=written["width"], height=written["height"], audio=written["audio"],
                  fps=round(fps, 3), faces_png=preview_path, sampling_s=round(t2 - t1, 2),
                  total_s=round(time.time() - t0, 2))
    return report


def speed_and_memory(models: Models, args, width: int, height: int, num_frames: int, people: int):
    """Apply --fast / --compile / --attention once, then plan memory for this job
    (:func:`~fantasyportrait_core.memory.plan_memory`): guidance passes per forward, and block
    offload (diffusers group offload, next block on a side CUDA stream) when the plan needs it."""
    from .adapter import floor_to_4k1
    from .fp8 import ScaledFP8Linear, quantize_model_fp8, set_fp8_compute
    from .memory import measured_size, plan_memory, tokens_per_forward
    from .residency import available_ram_bytes, enable_block_offload, free_vram_bytes
    from .sampling import guidance_passes

    tr, device = models.transformer, torch.device(args.device)
    if not getattr(models, "_speed_set", False):
        set_attention_backend(tr, getattr(args, "attention", "sdpa"))
        if getattr(args, "fast", False):
            if not any(isinstance(m, ScaledFP8Linear) for m in tr.modules()):
                quantize_model_fp8(tr)
            log.info("[FantasyPortrait] fast mode: %s", set_fp8_compute(tr, "scaled_mm", device))
        if getattr(args, "compile", False):
            tr.compile_repeated_blocks()
        models._speed_set = True
    storage = "fp8" if any(isinstance(m, ScaledFP8Linear) for m in tr.modules()) else "bf16"
    passes = guidance_passes(args.cfg, args.portrait_cfg)
    offload = "block" if getattr(models, "_offloaded", False) else getattr(args, "offload", "auto")
    plan = plan_memory(measured_size(tr, models.adapter),
                       tokens_per_forward(width, height, num_frames, floor_to_4k1(args.context_frames)),
                       free_vram_bytes(device), passes=len(passes), people=people,
                       portrait_passes=sum(w for _, w in passes), storage=storage, offload=offload)
    log.info("[FantasyPortrait] %s", plan.describe())
    if plan.offload == "block" and device.type == "cuda" and not getattr(models, "_offloaded", False):
        enable_block_offload(tr, device, available_ram_bytes(), adapter=models.adapter)
        models._offloaded = True
    return plan


def _trim(video: Video, frames: int | None) -> Video:
    """Only the frames that will be generated are worth detecting and encoding."""
    return video if frames is None else Video(video.frames[:frames], video.fps, video.path)


def _print_report(report: dict):
    print(json.dumps(report, indent=1, ensure_ascii=False))


def cmd_demo(args) -> int:
    check_sampling_args(args)
    data = args.data
    need = ["man.jpeg", "jgz.mp4", "two_person.png", "biden.mp4", "trump.mp4"]
    missing = [f for f in need if not os.path.isfile(os.path.join(data, f))]
    if missing:
        print(f"demo inputs missing in {data}: {missing}; pass --data DIR", file=sys.stderr)
        return 2
    print("FantasyPortrait demo: RANDOM WEIGHTS. No pretrained weights can be downloaded here, so a tiny randomly\n"
          "initialised Wan/adapter/VAE is built from config. Face detection, alignment, expression encoding,\n"
          "masks, windows, guidance and video IO are real; the output pixels are not a meaningful animation.\n")
    models = tiny_random_models(args.seed)
    loras = apply_cli_loras(models.transformer, args.lora)
    reports = []
    jobs = [("single_man_jgz.mp4", "man.jpeg", ["jgz.mp4"]),
            ("multi_two_person_biden_trump.mp4", "two_person.png", ["biden.mp4", "trump.mp4"])]
    for out_name, image_name, video_names in jobs:
        image = read_image(os.path.join(data, image_name))
        videos = [read_video(os.path.join(data, v)) for v in video_names]
        videos = [_trim(resample_fps(v, videos[0].fps), args.frames) for v in videos]
        report = animate(models, image, videos, os.path.join(args.out, out_name), args)
        report["reference"] = image_name
        if loras:
            report["loras"] = loras
        print(f"== {image_name} + {', '.join(video_names)}: {len(report['reference_faces'])} face(s) in the "
              f"reference; wrote {report['frames']} frames {report['width']}x{report['height']} (checked by decoding "
              f"the MP4), faces/masks preview {report['faces_png']}")
        _print_report(report)
        reports.append(report)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(reports, f, indent=1, ensure_ascii=False)
    return 0


def cmd_run(args) -> int:
    check_sampling_args(args)
    use_random = args.tiny_random or not (args.wan_dir or args.adapter or args.transformer)
    if use_random:
        print("RANDOM WEIGHTS: no checkpoints given, using a tiny random model (output is not a real animation).")
    models = tiny_random_models(args.seed) if use_random else real_models(args)
    loras = apply_cli_loras(models.transformer, args.lora)
    image = read_image(args.image)
    videos = [read_video(v) for v in args.driving]
    fps = args.fps or videos[0].fps
    videos = [_trim(resample_fps(v, fps), args.frames) for v in videos]  # drivers in step, same rate
    people = args.people or (len(videos) if len(videos) > 1 else 1)
    report = animate(models, image, videos, args.out, args, people=people, prompt=args.prompt,
                     negative_prompt=args.negative_prompt)
    if loras:
        report["loras"] = loras
    _print_report(report)
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parser().parse_args(argv)
    try:
        return cmd_demo(args) if args.command == "demo" else cmd_run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

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
from dataclasses import dataclass, field

import numpy as np
import torch

from . import pipeline as P
from .adapter import floor_to_4k1
from .attention import ATTENTION_BACKENDS, attach_portrait_processors, set_attention_backend
from .context import ANCHORS, CONTEXT_MODES
from .denoiser import I2VConditioning
from .detectors import BACKENDS, BackendUnavailable, make_detector
from .models import DTYPES
from .preview import add_caption, detector_label, draw_faces
from .restore import restored
from .validate import (InputError, check_face_order, check_float, check_image_size, check_input_dir,
                       check_input_file, check_int, check_output_path, parse_face_order)
from .video import (Video, VideoStream, load_frames, probe_image, probe_video, read_image, read_video,
                    save_video, write_video)

log = logging.getLogger("FantasyPortrait")
MAX_PEOPLE = 8


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
        p.add_argument("--detector", choices=BACKENDS, default="auto",
                       help="face detector: auto (official ONNX pair when both files are in --detector-dir and "
                            "onnxruntime is installed, else mtcnn), mtcnn (offline), mediapipe, insightface, "
                            "official (ONNX pair); see docs/INSTALL.md")
        p.add_argument("--detector-dir", default=None,
                       help="folder with face_det.onnx + face_landmark.onnx (default models/fantasyportrait), "
                            "or for insightface its root holding models/buffalo_l")
        p.add_argument("--landmark-filter", choices=P.LANDMARK_FILTERS, default="one_euro",
                       help="landmark filter before alignment: one_euro (the reference's) or none")
        p.add_argument("--smooth", type=float, default=0.0,
                       help="extra Gaussian landmark smoothing, sigma in frames (0 = none, as the reference)")
        p.add_argument("--fps", type=float, default=P.OUTPUT_FPS,
                       help="output frame rate; every driving video is resampled to it (default 25, as the reference's "
                            "multi-character script; its single-character script keeps the driver's rate)")
        p.add_argument("--long-video", choices=CONTEXT_MODES, default="auto",
                       help="auto: one pass (as the reference) when it fits in free memory, else windows; "
                            "one_pass; windows")
        p.add_argument("--context-frames", type=int, default=81, help="window length when windows are used")
        p.add_argument("--context-overlap", type=int, default=16, help="frames shared by neighbouring windows")
        p.add_argument("--window-anchor", choices=ANCHORS, default="reference",
                       help="reference: later windows also see the first frame with the reference condition")
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
    drive = run.add_mutually_exclusive_group(required=True)
    drive.add_argument("--driving", nargs="+",
                       help="driving videos: one per character (characters take the reference faces in reading "
                            "order: rows top to bottom, left to right), or videos showing several people (--people)")
    drive.add_argument("--expression", nargs="+", metavar="FILE",
                       help="saved performances (.safetensors from --save-expression or Save Performance), one per "
                            "character, in place of --driving: no video or face detection of a driver needed")
    run.add_argument("--out", required=True,
                     help="output video (.mp4, .mov or .mkv; a _faces.png preview is written beside it)")
    run.add_argument("--prompt", default="")
    run.add_argument("--negative-prompt", default=None)
    run.add_argument("--people", type=int, nargs="+", default=None,
                     help="people to animate from each driving video: one number for every video, or one number "
                          "per video (default: 1 each); they are taken in reading order")
    run.add_argument("--assign", choices=P.ASSIGN_MODES, default="left_to_right",
                     help="which reference face each character animates")
    run.add_argument("--face-order", default="",
                     help="face number (as on the _faces.png preview, reading order from 0) per character, e.g. 1,0; "
                          "overrides --assign")
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
    _direction_options(run)

    enc = sub.add_parser("encode", help="encode a *.frames.npz (kept when a video could not be written) to a video")
    enc.add_argument("frames_file", help="the .frames.npz file")
    enc.add_argument("--out", required=True, help="output video (.mp4, .mov or .mkv)")
    enc.add_argument("--fps", type=float, default=None, help="frame rate (default: the one stored in the file)")
    _evaluate_parser(sub)
    return ap


def _direction_options(p):
    """Directing the performance (fantasyportrait_core.direction / .performance)."""
    from .direction import CHANNELS
    from .performance import LOOP_MODES

    ch = "|".join(CHANNELS)
    p.add_argument("--strength", action="append", default=[], metavar="[C:]CHANNEL=S[,CHANNEL=S...]",
                   help=f"per-channel strength in [0, 2] ({ch}): 1 follows the driver (default), 0 holds the "
                        f"portrait's own value (head_pose=0: the expression without the head motion), up to 2 "
                        f"exaggerates; a C: prefix (1:mouth=1.5) addresses character C only; repeatable")
    p.add_argument("--strength-keys", action="append", default=[], metavar="[C:]CHANNEL=FRAME:S[,FRAME:S...]",
                   help="a channel's strength keyframed over the output frames, linear between keys, held before "
                        "the first and after the last, e.g. mouth=0:1,40:0.3,80:1; overrides --strength for it")
    p.add_argument("--motion", action="append", default=[], metavar="[C:]absolute|relative",
                   help="absolute (default, as the reference): the driver's expression; relative: the portrait's own "
                        "expression plus the driver's change from its neutral frame")
    p.add_argument("--neutral-frame", action="append", default=[], metavar="[C:]N",
                   help="the driver's frame taken as neutral with --motion relative (default 0, the first)")
    p.add_argument("--save-expression", default=None, metavar="FILE",
                   help="save each character's encoded performance (before --strength/--motion) to FILE.safetensors "
                        "(characters after the first: FILE_1, FILE_2... before the suffix), reusable with --expression")
    p.add_argument("--expression-speed", type=float, default=1.0,
                   help="--expression: play the saved performances this many times as fast (resampled to --fps)")
    p.add_argument("--expression-loop", choices=LOOP_MODES, default="none",
                   help="--expression: loop a performance shorter than --frames (repeat or pingpong)")
    p.add_argument("--expression-start", type=int, default=0,
                   help="--expression: first saved frame to use (trim, frames as saved)")
    p.add_argument("--expression-end", type=int, default=0,
                   help="--expression: frame after the last saved frame to use (trim; 0 = to the end)")


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


def _evaluate_parser(sub):
    ev = sub.add_parser("evaluate", help="how faithfully a generated video follows its driving video(s)",
                        description="Expression-fidelity metrics per character (PD-FGC expression and head-pose "
                                    "distances, eye/mouth curves, identity with insightface) and an overall score "
                                    "in [0, 1]; see fantasyportrait_core/evaluate.py and the README.")
    ev.add_argument("--driving", nargs="+", required=True,
                    help="the driving video(s) the generation used: one per character, or one with --people N")
    ev.add_argument("--generated", required=True, help="the generated video")
    ev.add_argument("--people", type=int, default=None, help="characters in a single driving video")
    ev.add_argument("--image", default=None, help="reference image (identity target; default: first generated frame)")
    ev.add_argument("--assign", choices=P.ASSIGN_MODES, default="left_to_right",
                    help="the assignment the generation used (which face each character animates)")
    ev.add_argument("--face-order", default="", help="the --face-order the generation used, e.g. 1,0")
    ev.add_argument("--frames", type=int, default=None, help="compare at most this many frames (default: all)")
    ev.add_argument("--offset", type=int, default=0,
                    help="compare generated frame i+OFFSET with driving frame i (negative: the driving side is "
                         "advanced); e.g. to measure a known lag")
    ev.add_argument("--pd-fpg", default=None,
                    help="PD-FGC encoder (pd_fpg.pth or the repacked adapter) for the expression/head-pose metrics")
    ev.add_argument("--tiny-random", action="store_true",
                    help="random PD-FGC encoder (plumbing checks only: its distances are not meaningful)")
    ev.add_argument("--landmarks", choices=("auto", "mesh", "crop"), default="auto",
                    help="eye/mouth curves from MediaPipe Face Mesh (if installed with its models) or the aligned crop")
    ev.add_argument("--detector", choices=BACKENDS, default="mtcnn")
    ev.add_argument("--detector-dir", default=None)
    ev.add_argument("--min-face-size", type=int, default=0,
                    help="mtcnn: smallest face side searched, px (0 = a tenth of the smallest video side, min 20)")
    ev.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ev.add_argument("--json", default=None, help="write every metric to this JSON file")
    ev.add_argument("--plot", default=None, help="write the per-frame curves to this PNG")


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

    dtype = DTYPES[args.dtype]
    transformer = load_transformer(args.transformer or os.path.join(args.wan_dir, "transformer"), dtype=dtype,
                                   device="cpu", storage_dtype=torch.float8_e4m3fn if args.fp8 or args.fast else None)
    adapter = load_adapter(args.adapter, dtype=dtype)
    encoder = load_expression_encoder(args.pd_fpg or args.adapter)
    vae = AutoencoderKLWan.from_pretrained(os.path.join(args.wan_dir, "vae"), torch_dtype=torch.float32).eval()
    return Models(transformer, adapter, vae, encoder, WanConditioners(args.wan_dir, dtype, args.device))


# ----------------------------------------------------------------------------------------------
# Validation: every cheap check, before any model is loaded or any frame decoded


@dataclass
class RunPlan:
    """What a validated ``run`` (or one ``demo`` job) will do.

    Attributes:
        image: reference image path; image_size: its (width, height).
        videos: one :class:`~fantasyportrait_core.video.VideoStream` per driving video, all at
            ``fps``, each yielding at most ``frames`` frames (nothing beyond is ever decoded).
        people: people to animate from each video; characters: their sum.
        fps: output and driving frame rate.
        frames: most frames that can be generated (4k+1).
        face_order: parsed ``--face-order`` or ``None``.
        out: absolute output path; real: real checkpoints (else the tiny random model).
        performances: saved performances loaded for ``--expression`` (then ``videos`` is empty).
        directions: one :class:`~fantasyportrait_core.direction.Direction` per character.
    """

    image: str
    image_size: tuple[int, int]
    videos: list
    people: list[int]
    characters: int
    fps: float
    frames: int
    face_order: list[int] | None
    out: str
    real: bool = False
    performances: list = field(default_factory=list)  # --expression: DrivingExpression per character
    directions: list | None = None  # --strength/--motion...: one direction.Direction per character


def validate_common(args) -> None:
    """Numbers and options shared by ``run`` and ``demo``.

    Raises:
        InputError: one line naming the option, the value and the fix.
    """
    check_int("--frames", args.frames, 1, 100_000, fix="the number of frames to generate, e.g. 81")
    check_int("--steps", args.steps, 1, 1000, fix="30 is the reference setting, 4-8 with a distilled LoRA")
    check_int("--max-size", args.max_size, 64, 4096, fix="the longest side of the output in pixels, e.g. 720")
    check_float("--cfg", args.cfg, 0.0, 30.0, fix="1 switches text guidance off (the reference setting)")
    check_float("--portrait-cfg", args.portrait_cfg, 0.0, 30.0, fix="the reference uses 4; <= 1 is off")
    check_float("--portrait-scale", args.portrait_scale, 0.0, 10.0, fix="1 is the reference strength")
    check_float("--shift", args.shift, 0.0, 100.0, lo_open=True, fix="the reference uses 5")
    check_int("--seed", args.seed, 0, 2**64 - 1)
    check_float("--smooth", args.smooth, 0.0, 20.0, fix="0 (off) or about 1 frame")
    check_int("--context-frames", args.context_frames, 5, 100_000,
              fix="the window length in frames, 81 as Wan2.1 was trained on")
    check_int("--context-overlap", args.context_overlap, 0, args.context_frames - 1,
              fix=f"frames shared by neighbouring windows, less than --context-frames ({args.context_frames})")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}: torch sees no CUDA GPU here; use --device cpu (slow) or install "
                         "a CUDA build of torch")
    try:
        torch.device(args.device)
    except (RuntimeError, TypeError):
        raise InputError(f"--device '{args.device}' is not a torch device; use cuda, cuda:1 or cpu") from None
    if args.detector in ("insightface", "official"):
        what = "insightface root (holding models/buffalo_l)" if args.detector == "insightface" else \
            "folder with face_det.onnx and face_landmark.onnx"
        check_input_dir(args.detector_dir, "--detector-dir", what)
        if args.detector == "official":
            for f in ("face_det.onnx", "face_landmark.onnx"):
                check_input_file(os.path.join(args.detector_dir, f), "--detector-dir", f)
    try:  # sampler, schedule, LoRAs, guidance interval (the sampling options' own checks)
        check_sampling_args(args)
    except (InputError, FileNotFoundError):
        raise
    except ValueError as e:
        raise InputError(str(e)) from None


def plan_job(image: str, driving: list[str], out: str, args, people=None, face_order: str = "") -> RunPlan:
    """Check one reference image, its driving videos, the people taken from each, the face order
    and the output path, probing the files' headers only.

    Raises:
        InputError: naming the option and the file.
    """
    check_input_file(image, "--image", "reference image")
    width, height = probe_image(image, "--image")
    check_image_size(width, height, f"--image '{image}'")
    out_abs = os.path.abspath(out) if out else out
    for path in driving:
        check_input_file(path, "--driving", "driving video")
        if os.path.abspath(path) == out_abs:
            raise InputError(f"--out '{out}' is also a driving video; writing it would destroy the input: choose "
                             f"another name")
    if os.path.abspath(image) == out_abs:
        raise InputError(f"--out '{out}' is the reference image; choose another name")
    out_abs = check_output_path(out, "--out")
    videos = [VideoStream(p, name=f"--driving '{p}'") for p in driving]
    fps = videos[0].source_fps if getattr(args, "fps", None) is None else \
        check_float("--fps", args.fps, 0.0, 240.0, lo_open=True, fix="the output frame rate, e.g. 25")
    cap = floor_to_4k1(args.frames)
    for v in videos:
        v.fps, v.max_frames = fps, cap
        if v.width < 32 or v.height < 32:
            raise InputError(f"--driving '{v.path}' is {v.width}x{v.height}; a face cannot be found in frames that "
                             f"small: use a larger video")
    if people is None:
        people = [1] * len(videos)
    elif len(people) == 1:
        people = list(people) * len(videos)
    elif len(people) != len(videos):
        raise InputError(f"--people has {len(people)} numbers for {len(videos)} driving videos; give one number for "
                         f"every video or one per video")
    for n in people:
        check_int("--people", n, 1, MAX_PEOPLE, fix="people to animate from a driving video")
    characters = sum(people)
    order = check_face_order(parse_face_order(face_order, "--face-order"), characters, name="--face-order")
    if getattr(args, "assign", None) == "identity" and args.detector != "insightface" and order is None:
        raise InputError(f"--assign identity needs identity embeddings, which only --detector insightface gives "
                         f"(now: {args.detector}); use --detector insightface or another --assign")
    return RunPlan(image, (width, height), videos, people, characters, fps, cap, order, out_abs)


def plan_performances(args) -> RunPlan:
    """``run --expression FILE...``: check the image and output like :func:`plan_job`, read each saved
    performance (:func:`~fantasyportrait_core.performance.load_performance`; no model, no video) and
    retime it to ``--fps`` at ``--expression-speed``, looped to ``--frames`` with ``--expression-loop``.

    Raises:
        InputError: a file that is not a saved performance, --people given, a bad speed or loop, or a
            performance shorter than asked without a loop.
    """
    from .performance import load_performance, retime

    if args.people:
        raise InputError("--people applies to --driving videos; a saved performance (--expression) is one character: "
                         "give one file per character")
    check_input_file(args.image, "--image", "reference image")
    width, height = probe_image(args.image, "--image")
    check_image_size(width, height, f"--image '{args.image}'")
    out_abs = os.path.abspath(args.out) if args.out else args.out
    for path in args.expression:
        if os.path.abspath(path) == out_abs:
            raise InputError(f"--out '{args.out}' is also a saved performance; choose another name")
    out_abs = check_output_path(args.out, "--out")
    fps = check_float("--fps", args.fps, 0.0, 240.0, lo_open=True, fix="the output frame rate, e.g. 25")
    cap = floor_to_4k1(args.frames)
    loop = getattr(args, "expression_loop", "none")
    performances = []
    for path in args.expression:
        perf = load_performance(path, "--expression")
        performances.append(retime(perf, fps, getattr(args, "expression_speed", 1.0),
                                   getattr(args, "expression_start", 0), getattr(args, "expression_end", 0) or None,
                                   frames=cap if loop != "none" else None, loop=loop, name=f"--expression '{path}'"))
    characters = len(performances)
    order = check_face_order(parse_face_order(args.face_order, "--face-order"), characters, name="--face-order")
    if getattr(args, "assign", None) == "identity" and order is None:
        raise InputError("--assign identity needs identity embeddings of the drivers, which a saved performance does "
                         "not hold; use --face-order or another --assign")
    return RunPlan(args.image, (width, height), [], [1] * characters, characters, fps, cap, order, out_abs,
                   performances=performances)


def plan_directions(args, plan: RunPlan) -> list:
    """One :class:`~fantasyportrait_core.direction.Direction` per character from --strength,
    --strength-keys, --motion and --neutral-frame; keys and neutral frames are checked against the
    frames that can be generated as far as the files' headers tell (again once the drivers are read).

    Raises:
        InputError: an unknown channel, a strength outside [0, 2], keys out of order or outside the
            video, a C: prefix naming no character, --save-expression not a .safetensors name.
    """
    from .direction import directions_from_args
    from .performance import EXTENSION

    directions = directions_from_args(plan.characters, getattr(args, "strength", ()), getattr(args, "strength_keys", ()),
                                      getattr(args, "motion", ()), getattr(args, "neutral_frame", ()))
    known = [plan.frames] + [p.num_frames for p in plan.performances]
    known += [n for n in (v.estimated_frames() for v in plan.videos) if n]
    for d in directions:
        d.check(floor_to_4k1(min(known)), "the frames to generate")
    if not plan.performances and (getattr(args, "expression_speed", 1.0) != 1.0
                                  or getattr(args, "expression_loop", "none") != "none"
                                  or getattr(args, "expression_start", 0) or getattr(args, "expression_end", 0)):
        raise InputError("--expression-speed/-loop/-start/-end apply to saved performances (--expression); "
                         "drop them, or use --fps and --frames with --driving")
    save = getattr(args, "save_expression", None)
    if save and not save.lower().endswith(EXTENSION):
        raise InputError(f"--save-expression '{save}' must end in {EXTENSION}, e.g. "
                         f"{os.path.splitext(save)[0]}{EXTENSION}")
    return directions


def validate_run_args(args) -> RunPlan:
    """Every cheap check of ``run``'s arguments, in one place, before any model is loaded or any
    frame decoded: numbers (:func:`validate_common`), files and the output path, driving videos
    (headers probed), people per video, face order against the character count, modes that need
    embeddings, and the checkpoint paths of the real model. The reference face count is checked
    as soon as the reference is detected, before any driving frame.

    Returns:
        :class:`RunPlan`.
    Raises:
        InputError: one line naming the option, what was wrong and the fix.
    """
    validate_common(args)
    if getattr(args, "expression", None):
        plan = plan_performances(args)
    else:
        plan = plan_job(args.image, args.driving, args.out, args, args.people, args.face_order)
    plan.directions = plan_directions(args, plan)
    if getattr(args, "init_video", None):
        check_input_file(args.init_video, "--init-video", "video to start from")
        VideoStream(args.init_video, name=f"--init-video '{args.init_video}'")  # a readable video stream
    given = [f"--{n.replace('_', '-')}" for n in ("wan_dir", "adapter", "transformer", "pd_fpg") if getattr(args, n)]
    if args.tiny_random and given:
        raise InputError(f"--tiny-random builds a random model and would ignore {' '.join(given)}; drop --tiny-random "
                         f"to use the checkpoints, or drop {' '.join(given)}")
    plan.real = bool(given)
    if plan.real:
        if not args.wan_dir or not args.adapter:
            raise InputError("real-model mode needs --wan-dir (the diffusers Wan2.1-I2V folder) and --adapter; or "
                             "use --tiny-random")
        check_input_dir(args.wan_dir, "--wan-dir", "diffusers Wan2.1-I2V folder (with vae/, text_encoder/...)")
        check_input_dir(os.path.join(args.wan_dir, "vae"), "--wan-dir", "Wan2.1 folder holding vae/")
        check_input_file(args.adapter, "--adapter", "FantasyPortrait adapter")
        if args.transformer and not os.path.isdir(args.transformer):
            check_input_file(args.transformer, "--transformer", "Wan2.1-I2V transformer")
        if not args.transformer:
            check_input_dir(os.path.join(args.wan_dir, "transformer"), "--wan-dir",
                            "Wan2.1 folder holding transformer/ (or give --transformer)")
        if args.pd_fpg:
            check_input_file(args.pd_fpg, "--pd-fpg", "pd_fpg.pth expression encoder")
    return plan


# ----------------------------------------------------------------------------------------------
# Progress


@contextlib.contextmanager
def tqdm_progress(desc: str, total: int | None, unit: str = "frame"):
    """A tqdm bar on stderr as a ``progress(desc, total)`` context yielding ``update(n)``."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.5) as bar:
        yield bar.update


# ----------------------------------------------------------------------------------------------
# One generation


def animate(models: Models, image: np.ndarray, plan: RunPlan, args, prompt: str = "",
            negative_prompt: str | None = None) -> dict:
    """Run the whole pipeline for one reference image; write ``plan.out`` and ``*_faces.png``.

    Order: reference faces first (one image: checks the face count and face order before any
    driving frame is decoded), then the driving videos as streams (only the frames used), then
    sampling with a restore guard, decoding and a write that never loses the result.

    Returns:
        A report dict (faces in reading order, which face each character drives, unused faces,
        frames filled, sizes, timings) that is also printed.
    Raises:
        InputError: a reference or driving video without the faces asked of it.
    """
    import cv2

    t0 = time.time()
    device = args.device
    report = {"output": plan.out, "random_weights": models.random, "sampler": args.preset or args.sampler}
    detector = make_detector(args.detector, args.detector_dir)
    mode = getattr(args, "assign", "left_to_right")
    report["detector"] = detector_label(detector)
    try:
        # Reference side (one image): face count and order are checked before any driving frame.
        width, height = P.generation_size(image.shape[1], image.shape[0], args.max_size)
        ref = P.resize_image(image, width, height)
        faces = P.detect_reference(detector, ref)
        report["reference_faces"] = [{"face": k, "box": [round(float(v), 1) for v in f.box],
                                      "score": round(f.score, 3)} for k, f in enumerate(faces)]
        chosen = None
        if plan.face_order is not None or mode != "identity":
            chosen = P.assign_faces(faces, plan.characters, plan.face_order, mode, order_name="--face-order")
        else:
            P.assign_faces(faces, plan.characters, list(range(plan.characters)))  # counts only

        # Driving side: streams, only the frames that will be used.
        drivers = []
        with P.on_device(models.encoder, device):
            for video, people in zip(plan.videos, plan.people):
                drivers += P.encode_driving(detector, models.encoder, video, people=people, smooth=args.smooth,
                                            landmark_filter=getattr(args, "landmark_filter", "one_euro"),
                                            source=video.path, fps=plan.fps, progress=tqdm_progress)
        drivers += plan.performances  # --expression: saved performances instead of videos
        if chosen is None:
            chosen = P.assign_faces(faces, len(drivers), None, mode, [P.driver_embedding(d) for d in drivers])
        num_frames = P.frames_for(drivers, args.frames)
        numbers = P.face_numbers(chosen, faces)
        drivers = direct_drivers(models, ref, chosen, drivers, plan, args, num_frames, report)
        rates = {v.path: v.source_fps for v in plan.videos}
        report["characters"] = [{"character": i, "face": numbers[i], "video": os.path.basename(d.source),
                                 "person_in_video": d.track_index, "people_in_video": d.people_seen,
                                 "frames": int(d.num_frames), "fps": round(plan.fps, 3),
                                 "source_fps": round(rates.get(d.source, plan.fps), 3),
                                 "frames_without_face": d.track.missing}
                                for i, d in enumerate(drivers)]
        report["faces_driven_by"] = {f"face #{numbers[i]}": d.label for i, d in enumerate(drivers)}
        unused = [k for k in range(len(faces)) if k not in numbers]
        report["unused_faces"] = unused
        if unused:
            log.warning("[FantasyPortrait] reference face(s) %s have no driver and stay as in the image; add driving "
                        "videos or --people to animate them", ", ".join(f"#{k}" for k in unused))
        for v, n in zip(plan.videos, plan.people):
            seen = max((d.people_seen for d in drivers if d.source == v.path), default=n)
            if seen > n:
                report.setdefault("notes", []).append(
                    f"{os.path.basename(v.path)} shows {seen} people; {n} animated (--people)")
        layout = P.reference_layout(chosen, drivers, width, height, num_frames)
    finally:
        detector.close()

    portrait = P.portrait_condition(models.adapter.to(device), drivers, num_frames, layout, args.portrait_scale)
    # One numbering everywhere: the face numbers --face-order takes, next to the character each drives.
    labels = [f"face #{numbers[i]} <- {d.label}" for i, d in enumerate(drivers)]
    labels += [f"face #{k}: no driver" for k in unused]
    preview = draw_faces(ref, chosen + [faces[k] for k in unused], layout.regions,
                         layout.latent_person if len(drivers) > 1 else None, labels)
    preview = add_caption(preview, f"detector: {report['detector']}")
    preview_path = os.path.splitext(plan.out)[0] + "_faces.png"
    _write_png(preview_path, cv2.cvtColor(preview, cv2.COLOR_RGB2BGR))

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
    from .sampling import schedule_sigmas

    steps = len(schedule_sigmas(args.steps, args.shift, sampling["denoise"], sampling["sigmas"], sampling["preset"])) - 1
    t1 = time.time()
    window, memory_plan = speed_and_memory(models, args, width, height, num_frames, len(drivers))
    report["memory_plan"] = memory_plan.describe()
    report["context"] = "one pass" if window is None else f"windows of {window} frames"
    placed = contextlib.nullcontext() if memory_plan.offload == "block" else P.on_device(models.transformer, device)
    # Whatever happens inside (Ctrl-C, out of memory, an error), the model leaves as it came.
    with tqdm_progress("sampling", steps, unit="step") as update, placed, \
            restored(models.transformer, models.state):
        latent = P.generate_latent(models.transformer, models.state, cond, portrait, num_frames, width, height,
                                   steps=args.steps, seed=args.seed, cfg=args.cfg, portrait_cfg=args.portrait_cfg,
                                   shift=args.shift, callback=lambda info: update(1),
                                   context_frames=window, context_overlap=args.context_overlap,
                                   window_anchor=getattr(args, "window_anchor", "reference"),
                                   init_latent=init, **sampling, batch_passes=memory_plan.batch_passes,
                                   device=device)
    t2 = time.time()
    with P.on_device(models.vae, device):
        frames = P.decode_latent(models.vae, latent)
    saved = save_video(plan.out, frames, plan.fps, audio_from=plan.videos[0].path if plan.videos else None)
    report.update(faces_png=preview_path, sampling_s=round(t2 - t1, 2), fps=round(plan.fps, 3))
    if saved.path is None:
        report.update(output=None, fallback=saved.fallback, error=saved.error)
        return report
    written = probe_video(plan.out)  # check what a player will see, not what we meant to write
    if (written["frames"], written["width"], written["height"]) != (num_frames, width, height):
        raise RuntimeError(f"{plan.out}: wrote {written} but expected {num_frames} frames {width}x{height}")
    report.update(frames=written["frames"], width=written["width"], height=written["height"], audio=written["audio"],
                  total_s=round(time.time() - t0, 2))
    return report


def direct_drivers(models: Models, ref: np.ndarray, chosen: list, drivers: list, plan: RunPlan, args,
                   num_frames: int, report: dict) -> list:
    """--save-expression (the encoded performances as read), then --strength/--motion: each
    character's features against the baseline of the reference face it animates
    (:func:`~fantasyportrait_core.direction.baseline_features` on ``ref``, the image the faces were
    found in). Drivers come back unchanged (the same objects) when no direction changes anything.

    Raises:
        InputError: keys or a neutral frame outside the ``num_frames`` generated frames.
    """
    from .direction import baseline_features, direct
    from .performance import performance_paths, save_performance

    if getattr(args, "save_expression", None):
        paths = [save_performance(path, d) for path, d in zip(performance_paths(args.save_expression, len(drivers)),
                                                                drivers)]
        report["saved_expressions"] = paths
    directions = plan.directions or []
    if not any(not d.is_identity for d in directions):
        return drivers
    for d in directions:
        d.check(num_frames, f"the {num_frames} generated frames")
    with P.on_device(models.encoder, args.device):
        baselines = baseline_features(models.encoder, ref, chosen)
    report["direction"] = [{"character": i, "settings": d.describe()} for i, d in enumerate(directions)]
    return [direct(drv, d, b) for drv, d, b in zip(drivers, directions, baselines)]


def _write_png(path: str, bgr: np.ndarray):
    """Write a PNG via a temporary file in the same folder (never a half-written preview)."""
    import cv2

    ok, data = cv2.imencode(".png", bgr)
    tmp = path + ".partial"
    try:
        if not ok:
            raise OSError("PNG encoding failed")
        with open(tmp, "wb") as f:
            f.write(data.tobytes())
        os.replace(tmp, path)
    except OSError as e:
        log.warning("[FantasyPortrait] could not write the face preview %s (%s)", path, e)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def speed_and_memory(models: Models, args, width: int, height: int, num_frames: int, people: int):
    """Apply --fast / --compile / --attention once, then plan this job
    (:func:`~fantasyportrait_core.memory.plan_sampling`): one pass or windows (--long-video), guidance
    passes per forward, and block offload (diffusers group offload, next block on a side CUDA stream)
    when the plan needs it. Returns ``(window, plan)``: window in pixel frames (``None``: one pass)."""
    from .fp8 import ScaledFP8Linear, quantize_model_fp8, set_fp8_compute
    from .memory import measured_size, plan_sampling
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
    offload = "block" if getattr(models, "_offloaded", False) else getattr(args, "offload", "auto")
    window, plan = plan_sampling(measured_size(tr, models.adapter), width, height, num_frames,
                                 free_vram_bytes(device), guidance_passes(args.cfg, args.portrait_cfg), people,
                                 storage, offload, getattr(args, "long_video", "auto"), args.context_frames,
                                 getattr(args, "window_anchor", "reference") == "reference")
    log.info("[FantasyPortrait] %s", plan.describe())
    if plan.offload == "block" and device.type == "cuda" and not getattr(models, "_offloaded", False):
        enable_block_offload(tr, device, available_ram_bytes(), adapter=models.adapter)
        models._offloaded = True
    return window, plan


def _print_report(report: dict):
    print(json.dumps(report, indent=1, ensure_ascii=False))


def cmd_demo(args) -> int:
    validate_common(args)
    data = args.data
    need = ["man.jpeg", "jgz.mp4", "two_person.png", "biden.mp4", "trump.mp4"]
    missing = [f for f in need if not os.path.isfile(os.path.join(data, f))]
    if missing:
        raise InputError(f"--data: demo inputs {missing} missing in {data}; pass --data DIR (the shared data folder)")
    jobs = [("single_man_jgz.mp4", "man.jpeg", ["jgz.mp4"]),
            ("multi_two_person_biden_trump.mp4", "two_person.png", ["biden.mp4", "trump.mp4"])]
    plans = [plan_job(os.path.join(data, image_name), [os.path.join(data, v) for v in video_names],
                      os.path.join(args.out, out_name), args) for out_name, image_name, video_names in jobs]
    print("FantasyPortrait demo: RANDOM WEIGHTS. No pretrained weights can be downloaded here, so a tiny randomly\n"
          "initialised Wan/adapter/VAE is built from config. Face detection, alignment, expression encoding,\n"
          "masks, windows, guidance and video IO are real; the output pixels are not a meaningful animation.\n")
    models = tiny_random_models(args.seed)
    loras = apply_cli_loras(models.transformer, args.lora)
    reports = []
    for plan, (_, image_name, video_names) in zip(plans, jobs):
        report = animate(models, read_image(plan.image), plan, args)
        report["reference"] = image_name
        if loras:
            report["loras"] = loras
        if report.get("output") is None:
            _print_report(report)
            return 1
        print(f"== {image_name} + {', '.join(video_names)}: {len(report['reference_faces'])} face(s) in the "
              f"reference; wrote {report['frames']} frames {report['width']}x{report['height']} (checked by decoding "
              f"the video), faces/masks preview {report['faces_png']}")
        _print_report(report)
        reports.append(report)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(reports, f, indent=1, ensure_ascii=False)
    return 0


def cmd_run(args) -> int:
    plan = validate_run_args(args)
    if not plan.real:
        print("RANDOM WEIGHTS: no checkpoints given, using a tiny random model (output is not a real animation).")
    models = real_models(args) if plan.real else tiny_random_models(args.seed)
    loras = apply_cli_loras(models.transformer, args.lora)
    image = read_image(plan.image)
    report = animate(models, image, plan, args, prompt=args.prompt, negative_prompt=args.negative_prompt)
    if loras:
        report["loras"] = loras
    _print_report(report)
    if report.get("output") is None:
        print(f"error: could not write {plan.out} ({report['error']}); the frames are saved in {report['fallback']}: "
              f"python -m fantasyportrait_core.cli encode {report['fallback']} --out VIDEO.mp4", file=sys.stderr)
        return 1
    return 0


def cmd_encode(args) -> int:
    """Encode a ``*.frames.npz`` fallback file to a video."""
    check_input_file(args.frames_file, "frames_file", ".frames.npz file")
    out = check_output_path(args.out, "--out")
    frames, fps = load_frames(args.frames_file)
    if args.fps is not None:
        fps = check_float("--fps", args.fps, 0.0, 240.0, lo_open=True)
    write_video(out, frames, fps)
    print(f"wrote {out}: {len(frames)} frames at {fps:g} fps")
    return 0


def cmd_evaluate(args) -> int:
    """``evaluate``: read the videos, resample the driving ones to the generated video's rate,
    measure (:func:`fantasyportrait_core.evaluate.evaluate`), print the table, write JSON / PNG."""
    import cv2

    from . import evaluate as E

    check_input_file(args.generated, "--generated", "generated video")
    for v in args.driving:
        check_input_file(v, "--driving", "driving video")
    generated = read_video(args.generated)
    videos = [read_video(v, fps=generated.fps) for v in args.driving]
    gen_frames = generated.frames
    if args.offset > 0:
        gen_frames = gen_frames[args.offset:]
    elif args.offset < 0:
        videos = [Video(v.frames[-args.offset:], v.fps, v.path) for v in videos]
    if len(gen_frames) == 0 or any(len(v) == 0 for v in videos):
        raise InputError(f"--offset {args.offset} leaves no frame to compare; use a smaller offset")
    if args.frames is not None:
        if args.frames < 1:
            raise InputError(f"--frames must be at least 1, got {args.frames}")
        gen_frames = gen_frames[:args.frames]
    kw = {}
    if args.detector == "mtcnn":
        shortest = min(min(f.shape[1:3]) for f in [gen_frames] + [v.frames for v in videos])
        kw["min_face_size"] = args.min_face_size or max(20, shortest // 10)
    encoder, random_encoder = None, False
    if args.pd_fpg:
        from .checkpoints import load_expression_encoder

        encoder = load_expression_encoder(args.pd_fpg, device=args.device)
    elif args.tiny_random:
        from .expression import FanEncoder

        torch.manual_seed(0)
        encoder, random_encoder = FanEncoder().eval().to(args.device), True
        print("RANDOM PD-FGC encoder: expression and head-pose distances are not meaningful.")
    detector = make_detector(args.detector, args.detector_dir, **kw)
    try:
        ev = E.evaluate(detector, [v.frames for v in videos], gen_frames, people=args.people, encoder=encoder,
                        reference=read_image(args.image) if args.image else None, assign=args.assign,
                        face_order=P.parse_face_order(args.face_order, "--face-order"), landmarks=args.landmarks,
                        encoder_random=random_encoder)
    finally:
        detector.close()
    report = {"generated": args.generated, "driving": list(args.driving), "fps": round(generated.fps, 3),
              "offset": args.offset, **ev.report}
    print(E.format_table(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(E.json_ready(report), f, indent=1)
        print(f"metrics: {args.json}")
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        title = os.path.basename(args.generated) + (f" (offset {args.offset})" if args.offset else "")
        if not cv2.imwrite(args.plot, cv2.cvtColor(E.plot(ev, title), cv2.COLOR_RGB2BGR)):
            raise InputError(f"cannot write the plot to {args.plot} (use a .png name in a writable folder)")
        print(f"plot: {args.plot}")
    return 0


def _oom_message(args) -> str:
    return (f"out of GPU memory at --max-size {args.max_size}, --frames {args.frames}, --context-frames "
            f"{args.context_frames}{', --fp8' if getattr(args, 'fp8', False) else ''}: add --fp8 (halves the "
            f"transformer weights), lower --max-size or --context-frames (e.g. 480 / 49), or run on a larger GPU")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parser().parse_args(argv)
    commands = {"demo": cmd_demo, "run": cmd_run, "encode": cmd_encode, "evaluate": cmd_evaluate}
    try:
        return commands[args.command](args)
    except (InputError, FileNotFoundError, BackendUnavailable) as e:  # a user mistake: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        print(f"error: {_oom_message(args)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

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
import json
import logging
import os
import sys

import torch

from fantasyportrait_core.drive.encode import LANDMARK_FILTERS
from fantasyportrait_core.faces.assign import ASSIGN_MODES
from fantasyportrait_core.validate import parse_face_order
from fantasyportrait_core.model.backends import ATTENTION_BACKENDS
from fantasyportrait_core.sampling.windows import ANCHORS, CONTEXT_MODES
from fantasyportrait_core.faces.detect import BACKENDS, make_detector
from fantasyportrait_core.faces.packages import BackendUnavailable
from fantasyportrait_core.runtime.job import Job, MemoryOptions, SamplingOptions, check_numbers
from fantasyportrait_core.model.build import DTYPES
from fantasyportrait_core.runtime.plan import check_sampling, plan_job, plan_run
from fantasyportrait_core.runtime import runner
from fantasyportrait_core.runtime.runner import oom_message, run_job
from fantasyportrait_core.validate import InputError, check_float, check_input_file, check_output_path, parse_face_order
from fantasyportrait_core.media.video import OUTPUT_FPS, Video, load_frames, read_image, read_video, write_video

log = logging.getLogger("FantasyPortrait")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fantasyportrait", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="tiny random model on the shared inputs (one and two characters)")
    demo.add_argument("--data", default=os.path.join("..", "shared", "data"))
    demo.add_argument("--out", default=os.path.join("outputs", "demo"))
    _common_options(demo)
    demo.set_defaults(frames=33, max_size=320, steps=8)

    run = sub.add_parser("run", help="animate one reference image")
    _run_arguments(run)
    from fantasyportrait_core.runtime.parallel import PARALLEL_MODES

    run.add_argument("--parallel", choices=PARALLEL_MODES, default="none",
                     help="one video on every GPU of a torchrun launch (torchrun --nproc-per-node N -m "
                          "fantasyportrait_core.cli run --parallel ...): cfg = the guidance passes of a step on "
                          "different GPUs, sequence = the tokens split over the GPUs (diffusers context "
                          "parallelism), auto = cfg when N divides the passes, else sequence; docs/SCALING.md")

    from fantasyportrait_core.runtime.batch import BATCH_HELP

    batch = sub.add_parser("batch", help="many jobs from a .jsonl/.csv file on one model load (resumable; "
                                         "torchrun shares the jobs over GPUs)",
                           description=BATCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    batch.add_argument("jobs", metavar="JOBS", help="jobs file: .jsonl (one JSON object a line) or .csv (header row)")
    batch.add_argument("--out", dest="out_dir", required=True, metavar="DIR",
                       help="folder of the outputs and batch_report.json; a job's 'out' is relative to it")
    _run_arguments(batch, batch=True, out=False)

    enc = sub.add_parser("encode", help="encode a *.frames.npz (kept when a video could not be written) to a video")
    enc.add_argument("frames_file", help="the .frames.npz file")
    enc.add_argument("--out", required=True, help="output video (.mp4, .mov or .mkv)")
    enc.add_argument("--fps", type=float, default=None, help="frame rate (default: the one stored in the file)")
    _evaluate_parser(sub)
    return ap


def _common_options(p):
    """Options of every generating command (demo, run, batch)."""
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
    p.add_argument("--landmark-filter", choices=LANDMARK_FILTERS, default="one_euro",
                   help="landmark filter before alignment: one_euro (the reference's) or none")
    p.add_argument("--smooth", type=float, default=0.0,
                   help="extra Gaussian landmark smoothing, sigma in frames (0 = none, as the reference)")
    p.add_argument("--fps", type=float, default=OUTPUT_FPS,
                   help="output frame rate; every driving video is resampled to it (default 25, as the reference's "
                        "multi-character script; its single-character script keeps the driver's rate)")
    p.add_argument("--long-video", choices=CONTEXT_MODES, default="auto",
                   help="auto: one pass (as the reference) when it fits in free memory, else windows; "
                        "one_pass; windows; flashportrait: FlashPortrait's windows (201/120 frames = 51/30 latent, "
                        "its anchor and blend; overrides --context-frames/--context-overlap/--window-anchor)")
    p.add_argument("--context-frames", type=int, default=81, help="window length when windows are used")
    p.add_argument("--context-overlap", type=int, default=16, help="frames shared by neighbouring windows")
    p.add_argument("--window-anchor", choices=ANCHORS, default="reference",
                   help="reference: later windows also see the first frame with the reference condition; "
                        "flashportrait: every window conditioned like the first, as FlashPortrait")
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


def _run_arguments(run, batch: bool = False, out: bool = True):
    """The options of ``run``; ``batch``: none required (a jobs file line or the batch command line
    gives them); ``out``: with ``--out`` as the output video."""
    run.add_argument("--image", required=not batch, help="reference image (the portrait to animate)")
    drive = run.add_mutually_exclusive_group(required=not batch)
    drive.add_argument("--driving", nargs="+",
                       help="driving videos: one per character (characters take the reference faces in reading "
                            "order: rows top to bottom, left to right), or videos showing several people (--people)")
    drive.add_argument("--expression", nargs="+", metavar="FILE",
                       help="saved performances (.safetensors from --save-expression or Save Performance), one per "
                            "character, in place of --driving: no video or face detection of a driver needed")
    if out:
        run.add_argument("--out", required=not batch,
                         help="output video (.mp4, .mov or .mkv; a _faces.png preview is written beside it)")
    run.add_argument("--prompt", default="")
    run.add_argument("--negative-prompt", default=None)
    run.add_argument("--people", type=int, nargs="+", default=None,
                     help="people to animate from each driving video: one number for every video, or one number "
                          "per video (default: 1 each); they are taken in reading order")
    run.add_argument("--assign", choices=ASSIGN_MODES, default="left_to_right",
                     help="which reference face each character animates")
    run.add_argument("--face-order", default="",
                     help="face number (as on the _faces.png preview, reading order from 0) per character, e.g. 1,0; "
                          "overrides --assign")
    run.add_argument("--transformer", help="Wan2.1-I2V transformer: file, shards, folder or .gguf (any supported format); "
                          "FlashPortrait: its transformer.pt (detected from its emo_k_proj keys)")
    run.add_argument("--wan-dir", help="diffusers Wan2.1-I2V folder (VAE, umT5, CLIP; transformer if not given)")
    run.add_argument("--transformer-2", help="EXPERIMENTAL: Wan2.2-I2V-A14B low-noise expert (--transformer is then the "
                                             "high-noise one); the adapter was trained on Wan2.1, quality on Wan2.2 not "
                                             "measured. A diffusers Wan2.2 --wan-dir with transformer_2/ needs no flag")
    run.add_argument("--boundary", type=float, default=0.9,
                     help="Wan2.2 experts: the high-noise expert runs while the timestep is >= boundary x 1000 (I2V: 0.9)")
    run.add_argument("--adapter-on", choices=("both", "high", "low"), default="both",
                     help="Wan2.2 experts: which experts run the portrait branch")
    run.add_argument("--adapter", help="fantasyportrait_model.ckpt or the repacked .safetensors; with FlashPortrait's "
                                         "transformer: its portrait_encoder.pt")
    run.add_argument("--pd-fpg", help="pd_fpg.pth (default: the pd_fpg.* keys of a repacked adapter)")
    run.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    run.add_argument("--fp8", action="store_true", help="store transformer weights in fp8 (bf16 compute)")
    run.add_argument("--tiny-random", action="store_true", help="use a tiny random model (no checkpoints)")
    run.add_argument("--init-video", default=None,
                     help="video to start from when --denoise < 1 (video-to-video; resized to the output size)")
    _common_options(run)
    _direction_options(run)


def _direction_options(p):
    """Directing the performance (fantasyportrait_core.drive.direction / .performance)."""
    from fantasyportrait_core.drive.direction import CHANNELS
    from fantasyportrait_core.drive.performance import LOOP_MODES

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
    """LoRAs, sampler, schedule, denoise and guidance interval (fantasyportrait_core.sampling.flow / .lora)."""
    from fantasyportrait_core.sampling.flow import PRESETS, SAMPLERS

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



def _evaluate_parser(sub):
    ev = sub.add_parser("evaluate", help="how faithfully a generated video follows its driving video(s)",
                        description="Expression-fidelity metrics per character (PD-FGC expression and head-pose "
                                    "distances, eye/mouth curves, identity with insightface) and an overall score "
                                    "in [0, 1]; see fantasyportrait_core/evaluation/ and the README.")
    ev.add_argument("--driving", nargs="+", required=True,
                    help="the driving video(s) the generation used: one per character, or one with --people N")
    ev.add_argument("--generated", required=True, help="the generated video")
    ev.add_argument("--people", type=int, default=None, help="characters in a single driving video")
    ev.add_argument("--image", default=None, help="reference image (identity target; default: first generated frame)")
    ev.add_argument("--assign", choices=ASSIGN_MODES, default="left_to_right",
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



def job_from_args(args) -> Job:
    """The :class:`~fantasyportrait_core.runtime.job.Job` of parsed ``run`` or ``demo`` arguments: the one
    place that reads the argparse namespace (sigmas, step ranges and --face-order parsed here, once).

    Raises:
        InputError: naming the option, for unparsable --sigmas, --portrait-scale-steps or --face-order.
    """
    from fantasyportrait_core.sampling.guidance import parse_step_ranges

    sigmas = None
    if args.sigmas:
        try:
            sigmas = [float(v) for v in args.sigmas.replace(" ", "").split(",") if v]
        except ValueError:
            raise InputError(f"--sigmas '{args.sigmas}' must be comma-separated numbers like 1,0.9375,0.8333,0.625,0") from None
    try:
        scales = parse_step_ranges(args.portrait_scale_steps, "--portrait-scale-steps")
    except InputError:
        raise
    except ValueError as e:
        raise InputError(str(e)) from None
    sampling = SamplingOptions(args.steps, args.cfg, args.portrait_cfg, args.portrait_scale, args.shift, args.seed,
                               args.sampler, args.preset, sigmas, args.denoise, (args.cfg_start, args.cfg_end),
                               (args.portrait_cfg_start, args.portrait_cfg_end), scales)
    run = args.command == "run"
    memory = MemoryOptions(args.device, args.dtype if run else "bf16", args.fp8 if run else False, args.fast,
                           args.compile, args.attention, args.offload, args.long_video, args.context_frames,
                           args.context_overlap, args.window_anchor)
    job = Job(frames=args.frames, max_size=args.max_size, fps=args.fps, detector=args.detector,
              detector_dir=args.detector_dir, landmark_filter=args.landmark_filter, smooth=args.smooth,
              sampling=sampling, memory=memory, loras=list(args.lora))
    if run:
        job = job.replace(image=args.image, driving=list(args.driving or []), expression=list(args.expression or []),
                          out=args.out, prompt=args.prompt, negative_prompt=args.negative_prompt, people=args.people,
                          assign=args.assign, face_order=parse_face_order(args.face_order, "--face-order"),
                          init_video=args.init_video, strength=args.strength, strength_keys=args.strength_keys,
                          motion=args.motion, neutral_frame=args.neutral_frame, save_expression=args.save_expression,
                          expression_speed=args.expression_speed, expression_loop=args.expression_loop,
                          expression_start=args.expression_start, expression_end=args.expression_end,
                          transformer=args.transformer, wan_dir=args.wan_dir, adapter=args.adapter,
                          pd_fpg=args.pd_fpg, tiny_random=args.tiny_random, transformer_2=args.transformer_2,
                          boundary=args.boundary, adapter_on=args.adapter_on)
    return job


def _print_report(report: dict):
    print(json.dumps(report, indent=1, ensure_ascii=False))


def cmd_demo(args) -> int:
    """``demo``: the two shared jobs (one and two characters) on one tiny random model."""
    data = args.data
    need = ["man.jpeg", "jgz.mp4", "two_person.png", "biden.mp4", "trump.mp4"]
    base = job_from_args(args)
    check_numbers(base)
    check_sampling(base)
    missing = [f for f in need if not os.path.isfile(os.path.join(data, f))]
    if missing:
        raise InputError(f"--data: demo inputs {missing} missing in {data}; pass --data DIR (the shared data folder)")
    specs = [("single_man_jgz.mp4", "man.jpeg", ["jgz.mp4"]),
             ("multi_two_person_biden_trump.mp4", "two_person.png", ["biden.mp4", "trump.mp4"])]
    jobs = [base.replace(image=os.path.join(data, image_name), driving=[os.path.join(data, v) for v in video_names],
                         out=os.path.join(args.out, out_name)) for out_name, image_name, video_names in specs]
    plans = [plan_job(job) for job in jobs]
    print("FantasyPortrait demo: RANDOM WEIGHTS. No pretrained weights can be downloaded here, so a tiny randomly\n"
          "initialised Wan/adapter/VAE is built from config. Face detection, alignment, expression encoding,\n"
          "masks, windows, guidance and video IO are real; the output pixels are not a meaningful animation.\n")
    models = runner.tiny_random_models(base.sampling.seed)
    reports = []
    for job, plan, (_, image_name, video_names) in zip(jobs, plans, specs):
        report = run_job(job, models, plan)
        report["reference"] = image_name
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
    """``run``: one job (:func:`~fantasyportrait_core.runtime.runner.run_job`); prints the report."""
    from fantasyportrait_core.runtime.parallel import TORCHRUN_HINT, Distributed, setup_parallel

    if args.parallel == "none" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError(f"run under torchrun ({os.environ['WORLD_SIZE']} processes) needs --parallel cfg|sequence|auto "
                         f"to split the video over them (else each would render it); for many clips use batch")
    dist = Distributed.from_env(args.device) if args.parallel != "none" else None
    if dist is None and args.parallel in ("cfg", "sequence"):
        raise InputError(f"--parallel {args.parallel} spreads one video over the processes of a torchrun launch: "
                         f"{TORCHRUN_HINT} run --parallel {args.parallel} ... (a single process runs without it)")
    try:
        if dist is not None:
            args.device = dist.device_for(args.device)
        job = job_from_args(args)
        plan = plan_run(job)
        models = None
        if dist is not None:
            if not plan.real:
                print("RANDOM WEIGHTS: no checkpoints given, using a tiny random model (output is not a real "
                      "animation).")
            models = runner.real_models(job) if plan.real else runner.tiny_random_models(job.sampling.seed)
            setup_parallel(models, args.parallel, dist, job)
        report = run_job(job, models, plan=plan)
    finally:
        if dist is not None:
            dist.close()
    if dist is not None and dist.rank != 0:
        return 0  # rank 0 writes and reports
    report.pop("latent", None)
    _print_report(report)
    if report.get("output") is None:
        print(f"error: could not write {plan.out} ({report['error']}); the frames are saved in {report['fallback']}: "
              f"python -m fantasyportrait_core.cli encode {report['fallback']} --out VIDEO.mp4", file=sys.stderr)
        return 1
    return 0


def _line_parser():
    """The parser of one jobs-file line: the ``run`` options, none required, errors raised."""
    from fantasyportrait_core.runtime.batch import RefusingParser

    p = RefusingParser(prog="jobs line", add_help=False)
    _run_arguments(p, batch=True)
    return p


def cmd_batch(args) -> int:
    """``batch``: :func:`~fantasyportrait_core.runtime.batch.main` with the ``run`` line parser and
    :func:`job_from_args` (every line built as ``run`` builds its job)."""
    from fantasyportrait_core.runtime import batch

    return batch.main(args, _line_parser(), job_from_args)


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
    measure (:func:`fantasyportrait_core.evaluation.compare.evaluate`), print the table, write JSON / PNG."""
    import cv2

    from fantasyportrait_core.evaluation.compare import evaluate
    from fantasyportrait_core.evaluation.report import format_table, json_ready, plot
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
        from fantasyportrait_core.weights.load import load_expression_encoder

        encoder = load_expression_encoder(args.pd_fpg, device=args.device)
    elif args.tiny_random:
        from fantasyportrait_core.model.expression import FanEncoder

        torch.manual_seed(0)
        encoder, random_encoder = FanEncoder().eval().to(args.device), True
        print("RANDOM PD-FGC encoder: expression and head-pose distances are not meaningful.")
    detector = make_detector(args.detector, args.detector_dir, **kw)
    try:
        ev = evaluate(detector, [v.frames for v in videos], gen_frames, people=args.people, encoder=encoder,
                      reference=read_image(args.image) if args.image else None, assign=args.assign,
                      face_order=parse_face_order(args.face_order, "--face-order"), landmarks=args.landmarks,
                      encoder_random=random_encoder)
    finally:
        detector.close()
    report = {"generated": args.generated, "driving": list(args.driving), "fps": round(generated.fps, 3),
              "offset": args.offset, **ev.report}
    print(format_table(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(json_ready(report), f, indent=1)
        print(f"metrics: {args.json}")
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        title = os.path.basename(args.generated) + (f" (offset {args.offset})" if args.offset else "")
        if not cv2.imwrite(args.plot, cv2.cvtColor(plot(ev, title), cv2.COLOR_RGB2BGR)):
            raise InputError(f"cannot write the plot to {args.plot} (use a .png name in a writable folder)")
        print(f"plot: {args.plot}")
    return 0



def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parser().parse_args(argv)
    commands = {"demo": cmd_demo, "run": cmd_run, "batch": cmd_batch, "encode": cmd_encode,
                "evaluate": cmd_evaluate}
    try:
        return commands[args.command](args)
    except (InputError, FileNotFoundError, BackendUnavailable) as e:  # a user mistake: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        print(f"error: {oom_message(job_from_args(args))}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

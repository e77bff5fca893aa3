"""Every cheap check of a :class:`~fantasyportrait_core.runtime.job.Job`, before any model is loaded or any
frame decoded: numbers, files and the output path, driving videos (headers probed), people per
video, face order against the character count, directions, and checkpoint paths.
:func:`plan_run` returns the :class:`RunPlan` that :func:`fantasyportrait_core.runtime.runner.animate` follows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from fantasyportrait_core.model.geometry import floor_to_4k1
from fantasyportrait_core.runtime.job import Job, check_numbers
from fantasyportrait_core.validate import (InputError, check_face_order, check_float, check_image_size, check_input_dir,
                       check_input_file, check_int, check_output_path)
from fantasyportrait_core.media.video import VideoStream, probe_image

MAX_PEOPLE = 8


@dataclass
class RunPlan:
    """What a validated ``run`` (or one ``demo`` job) will do.

    Attributes:
        image: reference image path; image_size: its (width, height).
        videos: one :class:`~fantasyportrait_core.media.video.VideoStream` per driving video, all at
            ``fps``, each yielding at most ``frames`` frames (nothing beyond is ever decoded).
        people: people to animate from each video; characters: their sum.
        fps: output and driving frame rate.
        frames: most frames that can be generated (4k+1).
        face_order: parsed ``--face-order`` or ``None``.
        out: absolute output path; real: real checkpoints (else the tiny random model).
        performances: saved performances loaded for ``--expression`` (then ``videos`` is empty).
        directions: one :class:`~fantasyportrait_core.drive.direction.Direction` per character.
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


def plan_job(job: Job) -> RunPlan:
    """Check one reference image, its driving videos, the people taken from each, the face order
    and the output path, probing the files' headers only.

    Raises:
        InputError: naming the option and the file.
    """
    image, driving, out, people = job.image, job.driving, job.out, job.people
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
    fps = videos[0].source_fps if job.fps is None else \
        check_float("--fps", job.fps, 0.0, 240.0, lo_open=True, fix="the output frame rate, e.g. 25")
    cap = floor_to_4k1(job.frames)
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
    order = check_face_order(job.face_order, characters, name="--face-order")
    if job.assign == "identity" and job.detector != "insightface" and order is None:
        raise InputError(f"--assign identity needs identity embeddings, which only --detector insightface gives "
                         f"(now: {job.detector}); use --detector insightface or another --assign")
    return RunPlan(image, (width, height), videos, people, characters, fps, cap, order, out_abs)


def check_sampling(job: Job) -> None:
    """Early, one-line errors for the sampling options: preset, sampler, schedule and guidance
    ranges (resolved once here), a schedule starting below full noise without an initial video,
    and unreadable ``--lora`` files.

    Raises:
        InputError: naming the option; FileNotFoundError: a --lora file that does not exist.
    """
    from fantasyportrait_core.weights.lora import parse_lora_arg

    try:
        resolved = job.sampling.resolve()
        lora_paths = [(spec, parse_lora_arg(spec)[0]) for spec in job.loras]
    except InputError:
        raise
    except ValueError as e:
        raise InputError(str(e)) from None
    if float(resolved.schedule[0]) < 1.0 and not job.init_video:
        raise InputError(f"the schedule starts at sigma {float(resolved.schedule[0]):.4f} < 1 (--denoise "
                         f"{job.sampling.denoise} or --sigmas): give --init-video to start from, or use --denoise 1")
    for spec, path in lora_paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--lora {spec}: file not found: {path}")


def plan_performances(job: Job) -> RunPlan:
    """``run --expression FILE...``: check the image and output like :func:`plan_job`, read each saved
    performance (:func:`~fantasyportrait_core.drive.performance.load_performance`; no model, no video) and
    retime it to ``--fps`` at ``--expression-speed``, looped to ``--frames`` with ``--expression-loop``.

    Raises:
        InputError: a file that is not a saved performance, --people given, a bad speed or loop, or a
            performance shorter than asked without a loop.
    """
    from fantasyportrait_core.drive.performance import load_performance, retime

    if job.people:
        raise InputError("--people applies to --driving videos; a saved performance (--expression) is one character: "
                         "give one file per character")
    check_input_file(job.image, "--image", "reference image")
    width, height = probe_image(job.image, "--image")
    check_image_size(width, height, f"--image '{job.image}'")
    out_abs = os.path.abspath(job.out) if job.out else job.out
    for path in job.expression:
        if os.path.abspath(path) == out_abs:
            raise InputError(f"--out '{job.out}' is also a saved performance; choose another name")
    out_abs = check_output_path(job.out, "--out")
    fps = check_float("--fps", job.fps, 0.0, 240.0, lo_open=True, fix="the output frame rate, e.g. 25")
    cap = floor_to_4k1(job.frames)
    loop = job.expression_loop
    performances = []
    for path in job.expression:
        perf = load_performance(path, "--expression")
        performances.append(retime(perf, fps, job.expression_speed, job.expression_start, job.expression_end or None,
                                   frames=cap if loop != "none" else None, loop=loop, name=f"--expression '{path}'"))
    characters = len(performances)
    order = check_face_order(job.face_order, characters, name="--face-order")
    if job.assign == "identity" and order is None:
        raise InputError("--assign identity needs identity embeddings of the drivers, which a saved performance does "
                         "not hold; use --face-order or another --assign")
    return RunPlan(job.image, (width, height), [], [1] * characters, characters, fps, cap, order, out_abs,
                   performances=performances)


def plan_directions(job: Job, plan: RunPlan) -> list:
    """One :class:`~fantasyportrait_core.drive.direction.Direction` per character from --strength,
    --strength-keys, --motion and --neutral-frame; keys and neutral frames are checked against the
    frames that can be generated as far as the files' headers tell (again once the drivers are read).

    Raises:
        InputError: an unknown channel, a strength outside [0, 2], keys out of order or outside the
            video, a C: prefix naming no character, --save-expression not a .safetensors name.
    """
    from fantasyportrait_core.drive.direction import directions_from_args
    from fantasyportrait_core.drive.performance import EXTENSION

    directions = directions_from_args(plan.characters, job.strength, job.strength_keys, job.motion, job.neutral_frame)
    known = [plan.frames] + [p.num_frames for p in plan.performances]
    known += [n for n in (v.estimated_frames() for v in plan.videos) if n]
    for d in directions:
        d.check(floor_to_4k1(min(known)), "the frames to generate")
    if not plan.performances and (job.expression_speed != 1.0 or job.expression_loop != "none"
                                  or job.expression_start or job.expression_end):
        raise InputError("--expression-speed/-loop/-start/-end apply to saved performances (--expression); "
                         "drop them, or use --fps and --frames with --driving")
    save = job.save_expression
    if save and not save.lower().endswith(EXTENSION):
        raise InputError(f"--save-expression '{save}' must end in {EXTENSION}, e.g. "
                         f"{os.path.splitext(save)[0]}{EXTENSION}")
    return directions


def plan_run(job: Job) -> RunPlan:
    """Every cheap check of ``run``'s arguments, in one place, before any model is loaded or any
    frame decoded: numbers (:func:`~fantasyportrait_core.runtime.job.check_numbers`), sampling (:func:`check_sampling`), files and the output path, driving videos
    (headers probed), people per video, face order against the character count, modes that need
    embeddings, and the checkpoint paths of the real model. The reference face count is checked
    as soon as the reference is detected, before any driving frame.

    Returns:
        :class:`RunPlan`.
    Raises:
        InputError: one line naming the option, what was wrong and the fix.
    """
    check_numbers(job)
    check_sampling(job)
    if job.expression:
        plan = plan_performances(job)
    else:
        plan = plan_job(job)
    plan.directions = plan_directions(job, plan)
    if job.init_video:
        check_input_file(job.init_video, "--init-video", "video to start from")
        VideoStream(job.init_video, name=f"--init-video '{job.init_video}'")  # a readable video stream
    given = [f"--{n.replace('_', '-')}" for n in ("wan_dir", "adapter", "transformer", "pd_fpg", "transformer_2")
             if getattr(job, n, None)]
    from fantasyportrait_core.sampling.experts import check_expert_options

    try:  # Wan2.2 experts (experimental): --boundary / --adapter-on
        check_expert_options(job.boundary, job.adapter_on)
    except ValueError as e:
        raise InputError(f"--{str(e).replace('_', '-')}") from None
    if job.tiny_random and given:
        raise InputError(f"--tiny-random builds a random model and would ignore {' '.join(given)}; drop --tiny-random "
                         f"to use the checkpoints, or drop {' '.join(given)}")
    plan.real = bool(given)
    if plan.real:
        if not job.wan_dir or not job.adapter:
            raise InputError("real-model mode needs --wan-dir (the diffusers Wan2.1-I2V folder) and --adapter; or "
                             "use --tiny-random")
        check_input_dir(job.wan_dir, "--wan-dir", "diffusers Wan2.1-I2V folder (with vae/, text_encoder/...)")
        check_input_dir(os.path.join(job.wan_dir, "vae"), "--wan-dir", "Wan2.1 folder holding vae/")
        check_input_file(job.adapter, "--adapter", "FantasyPortrait adapter")
        if job.transformer and not os.path.isdir(job.transformer):
            check_input_file(job.transformer, "--transformer", "Wan2.1-I2V transformer")
        if not job.transformer:
            check_input_dir(os.path.join(job.wan_dir, "transformer"), "--wan-dir",
                            "Wan2.1 folder holding transformer/ (or give --transformer)")
        if job.pd_fpg:
            check_input_file(job.pd_fpg, "--pd-fpg", "pd_fpg.pth expression encoder")
        if job.transformer_2 and not os.path.isdir(job.transformer_2):
            check_input_file(job.transformer_2, "--transformer-2", "Wan2.2-I2V-A14B low-noise expert")
    return plan




__all__ = ["MAX_PEOPLE", "RunPlan", "check_sampling", "plan_directions", "plan_job", "plan_performances", "plan_run"]

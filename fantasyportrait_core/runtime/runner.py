"""Run a :class:`~fantasyportrait_core.runtime.job.Job` end to end: build or take the models, assemble them
for the device (:func:`prepare_model`: attention backend, fp8 fast mode, compile, memory plan,
block offload), then :func:`animate` (reference faces, driving expressions, directions, portrait
condition, sampling, decoding, a write that never loses the result). The CLI's ``run`` and
``demo`` and the benchmarks call :func:`run_job`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

import numpy as np
import torch

from fantasyportrait_core.drive import encode as drive_encode
from fantasyportrait_core.sampling import generate
from fantasyportrait_core.drive.condition import portrait_condition
from fantasyportrait_core.faces.assign import assign_faces, detect_reference, driver_embedding, face_roles
from fantasyportrait_core.faces.layout import generation_size, reference_layout, resize_image
from fantasyportrait_core.runtime.residency import on_device
from fantasyportrait_core.model.attention import attach_portrait_processors
from fantasyportrait_core.model.denoiser import I2VConditioning
from fantasyportrait_core.faces.detect import make_detector
from fantasyportrait_core.runtime.job import Job
from fantasyportrait_core.runtime.memory import CLI_KNOBS, oom_advice
from fantasyportrait_core.model.build import DTYPES
from fantasyportrait_core.runtime.plan import RunPlan, plan_run
from fantasyportrait_core.faces.preview import add_caption, detector_label, draw_faces
from fantasyportrait_core.runtime.restore import restored
from fantasyportrait_core.sampling.experts import EXPERIMENTAL
from fantasyportrait_core.validate import InputError
from fantasyportrait_core.media.video import atomic_write, probe_video, read_image, read_video, save_video

log = logging.getLogger("FantasyPortrait")


def apply_lora_specs(transformer, specs: list[str]) -> list:
    """Read and apply ``FILE[:STRENGTH]`` LoRA specs (:func:`~fantasyportrait_core.weights.lora_apply.apply_loras`);
    returns the summaries for the report."""
    from fantasyportrait_core.weights.lora import parse_lora_arg, read_lora
    from fantasyportrait_core.weights.lora_apply import apply_loras

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
    from fantasyportrait_core.model.build import normalize_latent

    video = read_video(path, max_frames=num_frames)
    if len(video.frames) < num_frames:
        raise ValueError(f"--init-video {path} has {len(video.frames)} frames; {num_frames} are generated")
    frames = np.stack([resize_image(f, width, height) for f in video.frames])
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    p = next(vae.parameters())
    return normalize_latent(vae.encode(x.to(p.device, p.dtype)).latent_dist.mode().float()).cpu()


class Models:
    """Everything one generation needs; ``random`` tells the output to say the weights are random."""

    def __init__(self, transformer, adapter, vae, encoder, conditioners=None, random=False, transformer_2=None):
        """``transformer_2``: EXPERIMENTAL Wan2.2-I2V-A14B low-noise expert (``transformer`` is then the
        high-noise one); both get the same adapter's processors."""
        self.transformer, self.adapter, self.vae, self.encoder = transformer, adapter, vae, encoder
        self.conditioners, self.random = conditioners, random
        self.loras = None  # summaries of the LoRAs run_job applied (once per Models)
        self.state = attach_portrait_processors(transformer, adapter)
        self.parallel = None  # runtime.parallel.ParallelRun under torchrun --parallel (set by prepare_model)
        self.transformer_2 = transformer_2
        self.state_2 = None if transformer_2 is None else attach_portrait_processors(transformer_2, adapter)

    def experts(self, job: Job):
        """The :class:`~fantasyportrait_core.sampling.experts.ExpertPair` of a Wan2.2 model (``job``'s
        boundary and adapter_on; the expert not in use waits on the CPU), or ``None`` for Wan2.1."""
        if self.transformer_2 is None:
            return None
        from fantasyportrait_core.sampling.experts import Expert, ExpertPair

        return ExpertPair(Expert("high", self.transformer, self.state), Expert("low", self.transformer_2, self.state_2),
                          job.boundary, job.adapter_on)


def tiny_random_models(seed: int = 0) -> Models:
    """A tiny randomly initialised model (:func:`~fantasyportrait_core.model.build.random_tiny_models`)."""
    from fantasyportrait_core.model.build import random_tiny_models

    return Models(*random_tiny_models(seed), random=True)


def tiny_random_wan22_models(seed: int = 0) -> Models:
    """Tiny random Wan2.2-I2V-A14B-shaped experts (no image branch) with the tiny adapter, VAE and encoder."""
    from fantasyportrait_core.model.build import TINY_WAN22_EXPERT, build_transformer, random_tiny_models

    _, adapter, vae, encoder = random_tiny_models(seed)
    torch.manual_seed(seed + 1)
    high, low = build_transformer(TINY_WAN22_EXPERT).eval(), build_transformer(TINY_WAN22_EXPERT).eval()
    return Models(high, adapter, vae, encoder, random=True, transformer_2=low)


def real_models(job: Job) -> Models:
    """The real Wan2.1-I2V transformer, VAE, text/image encoders, adapter and PD-FGC encoder of ``job``;
    EXPERIMENTAL: both Wan2.2-I2V-A14B experts with ``--transformer-2`` or a diffusers Wan2.2 folder
    (``transformer/`` + ``transformer_2/``; no CLIP image encoder)."""
    from diffusers import AutoencoderKLWan

    from fantasyportrait_core.weights.load import load_adapter_for, load_expression_encoder, load_transformer
    from fantasyportrait_core.model.encoders import WanConditioners

    m = job.memory
    dtype = DTYPES[m.dtype]
    storage = torch.float8_e4m3fn if m.fp8 or m.fast else None
    high = job.transformer or os.path.join(job.wan_dir, "transformer")
    low = job.transformer_2
    if low is None and not job.transformer and os.path.isdir(os.path.join(job.wan_dir, "transformer_2")):
        low = os.path.join(job.wan_dir, "transformer_2")
    transformer_2 = None
    if low is not None:
        from fantasyportrait_core.weights.experts import load_wan22_experts

        transformer, transformer_2 = load_wan22_experts(high, low, dtype=dtype, device="cpu", storage_dtype=storage)
    else:
        transformer = load_transformer(high, dtype=dtype, device="cpu", storage_dtype=storage)
    adapter = load_adapter_for(transformer, job.adapter, dtype=dtype, transformer_name=job.transformer or job.wan_dir)
    encoder = load_expression_encoder(job.pd_fpg or job.adapter)
    vae = AutoencoderKLWan.from_pretrained(os.path.join(job.wan_dir, "vae"), torch_dtype=torch.float32).eval()
    return Models(transformer, adapter, vae, encoder,
                  WanConditioners(job.wan_dir, dtype, m.device, **({} if transformer_2 is None else {"image": False})),
                  transformer_2=transformer_2)


@contextlib.contextmanager
def tqdm_progress(desc: str, total: int | None, unit: str = "frame"):
    """A tqdm bar on stderr as a ``progress(desc, total)`` context yielding ``update(n)``."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.5) as bar:
        yield bar.update


# ----------------------------------------------------------------------------------------------
# One generation


def animate(models: Models, image: np.ndarray, plan: RunPlan, job: Job, stop=None) -> dict:
    """Run the whole pipeline for one reference image; write ``plan.out`` and ``*_faces.png``.

    ``stop``: called after every sampling step; raising there (e.g. ``KeyboardInterrupt`` after a
    Ctrl-C, :class:`~fantasyportrait_core.runtime.batch.Stop`) ends the run at a step boundary.
    Under ``--parallel`` (``models.parallel``, :mod:`~fantasyportrait_core.runtime.parallel`) every rank
    samples and only rank 0 writes files.

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
    device, opts = job.memory.device, job.sampling
    sampling = opts.resolve()  # the preset applied and the guidance schedule built once per run
    report = {"output": plan.out, "random_weights": models.random, "sampler": opts.preset or opts.sampler}
    detector = make_detector(job.detector, job.detector_dir)
    mode = job.assign
    report["detector"] = detector_label(detector)
    try:
        # Reference side (one image): face count and order are checked before any driving frame.
        width, height = generation_size(image.shape[1], image.shape[0], job.max_size)
        ref = resize_image(image, width, height)
        faces = detect_reference(detector, ref)
        report["reference_faces"] = [{"face": k, "box": [round(float(v), 1) for v in f.box],
                                      "score": round(f.score, 3)} for k, f in enumerate(faces)]
        chosen = None
        if plan.face_order is not None or mode != "identity":
            chosen = assign_faces(faces, plan.characters, plan.face_order, mode, order_name="--face-order")
        else:
            assign_faces(faces, plan.characters, list(range(plan.characters)))  # counts only

        # Driving side: streams, only the frames that will be used.
        drivers = []
        with on_device(models.encoder, device):
            for video, people in zip(plan.videos, plan.people):
                drivers += drive_encode.encode_driving(detector, models.encoder, video, people=people,
                                                       smooth=job.smooth, landmark_filter=job.landmark_filter,
                                                       source=video.path, fps=plan.fps, progress=tqdm_progress)
        drivers += plan.performances  # --expression: saved performances instead of videos
        if chosen is None:
            chosen = assign_faces(faces, len(drivers), None, mode, [driver_embedding(d) for d in drivers])
        num_frames = drive_encode.frames_for(drivers, job.frames)
        drivers = direct_drivers(models, ref, chosen, drivers, plan, job, num_frames, report)
        numbers, unused, shown, labels = face_roles(chosen, faces, drivers)
        rates = {v.path: v.source_fps for v in plan.videos}
        report["characters"] = [{"character": i, "face": numbers[i], "video": os.path.basename(d.source),
                                 "person_in_video": d.track_index, "people_in_video": d.people_seen,
                                 "frames": int(d.num_frames), "fps": round(plan.fps, 3),
                                 "source_fps": round(rates.get(d.source, plan.fps), 3),
                                 "frames_without_face": d.track.missing}
                                for i, d in enumerate(drivers)]
        report["faces_driven_by"] = {f"face #{numbers[i]}": d.label for i, d in enumerate(drivers)}
        report["unused_faces"] = unused
        if unused:
            log.warning("[FantasyPortrait] reference face(s) %s have no driver and stay as in the image; add driving "
                        "videos or --people to animate them", ", ".join(f"#{k}" for k in unused))
        for v, n in zip(plan.videos, plan.people):
            seen = max((d.people_seen for d in drivers if d.source == v.path), default=n)
            if seen > n:
                report.setdefault("notes", []).append(
                    f"{os.path.basename(v.path)} shows {seen} people; {n} animated (--people)")
        layout = reference_layout(chosen, drivers, width, height, num_frames)
    finally:
        detector.close()

    portrait = portrait_condition(models.adapter.to(device), drivers, num_frames, layout, opts.portrait_scale)
    # One numbering everywhere: the face numbers --face-order takes, next to the character each drives.
    preview = draw_faces(ref, shown, layout.regions,
                         layout.latent_person if len(drivers) > 1 else None, labels)
    preview = add_caption(preview, f"detector: {report['detector']}")
    preview_path = os.path.splitext(plan.out)[0] + "_faces.png"
    if _writer(models):
        _write_png(preview_path, cv2.cvtColor(preview, cv2.COLOR_RGB2BGR))

    # Conditions: text + CLIP image (real encoders) or seeded stand-ins (random tiny model).
    with on_device(models.vae, device):
        y = generate.encode_reference_latent(models.vae, ref, num_frames)
    cfg_t = models.transformer.config
    if models.conditioners is not None:
        from fantasyportrait_core.model.encoders import DEFAULT_NEGATIVE_PROMPT

        text_pos = models.conditioners.text(job.prompt)
        negative = DEFAULT_NEGATIVE_PROMPT if job.negative_prompt is None else job.negative_prompt
        text_neg = models.conditioners.text(negative) if sampling.cfg != 1.0 else None
        image_ctx = models.conditioners.image(ref) if cfg_t.image_dim is not None else None  # Wan2.2: no CLIP
    else:
        g = torch.Generator().manual_seed(opts.seed)
        text_pos = torch.randn(1, 16, cfg_t.text_dim, generator=g)
        text_neg = torch.randn(1, 16, cfg_t.text_dim, generator=g)
        image_ctx = None if cfg_t.image_dim is None else torch.randn(1, 257, cfg_t.image_dim, generator=g)
    cond = I2VConditioning(text_pos, text_neg, image_ctx, y)

    init = None
    if job.init_video:
        with on_device(models.vae, device):
            init = init_latent_from_video(models.vae, job.init_video, num_frames, width, height)
    t1, c1 = time.time(), time.process_time()
    window, memory_plan = prepare_model(models, job, width, height, num_frames, len(drivers), sampling)
    report["memory_plan"] = memory_plan.describe()
    report["context"] = "one pass" if window is None else f"windows of {window} frames"
    experts = models.experts(job)
    if experts is not None:  # one expert on the device at a time: the switch moves them
        experts.offload_device = None if memory_plan.offload == "block" else "cpu"
        report["model"] = (f"Wan2.2-I2V-A14B high/low-noise experts, adapter on {job.adapter_on}, boundary "
                           f"{job.boundary}: {EXPERIMENTAL}")
    placed = (contextlib.nullcontext() if memory_plan.offload == "block" or experts is not None
              else on_device(models.transformer, device))
    # Whatever happens inside (Ctrl-C, out of memory, an error), the model leaves as it came.
    def on_step(info):
        update(1)
        if stop is not None:
            stop()

    with tqdm_progress("sampling", sampling.steps, unit="step") as update, placed, \
            restored(models.transformer, models.state), \
            (restored(models.transformer_2, models.state_2) if experts is not None else contextlib.nullcontext()):
        latent = generate.generate_latent(models.transformer, models.state, cond, portrait, num_frames, width, height,
                                          seed=opts.seed, callback=on_step, context_frames=window,
                                          context_overlap=job.memory.context_overlap,
                                          window_anchor=job.memory.window_anchor, init_latent=init,
                                          batch_passes=memory_plan.batch_passes, device=device, resolved=sampling,
                                          experts=experts)
    if experts is not None:
        report["experts_by_step"] = [name for _, name in experts.trace]
    t2, c2 = time.time(), time.process_time()
    report.update(sampling_s=round(t2 - t1, 2), sampling_cpu_s=round(c2 - c1, 2))
    if not _writer(models):
        report.update(output=None, rank=models.parallel.rank, latent=latent)
        return report
    with on_device(models.vae, device):
        frames = generate.decode_latent(models.vae, latent)
    saved = save_video(plan.out, frames, plan.fps, audio_from=plan.videos[0].path if plan.videos else None)
    report.update(faces_png=preview_path, sampling_s=round(t2 - t1, 2), sampling_cpu_s=round(c2 - c1, 2),
                  fps=round(plan.fps, 3))
    if saved.path is None:
        report.update(output=None, fallback=saved.fallback, error=saved.error)
        return report
    written = probe_video(plan.out)  # check what a player will see, not what we meant to write
    if (written["frames"], written["width"], written["height"]) != (num_frames, width, height):
        raise RuntimeError(f"{plan.out}: wrote {written} but expected {num_frames} frames {width}x{height}")
    report.update(frames=written["frames"], width=written["width"], height=written["height"], audio=written["audio"],
                  total_s=round(time.time() - t0, 2))
    return report


def direct_drivers(models: Models, ref: np.ndarray, chosen: list, drivers: list, plan: RunPlan, job: Job,
                   num_frames: int, report: dict) -> list:
    """--save-expression (the encoded performances as read), then --strength/--motion: each
    character's features against the baseline of the reference face it animates
    (:func:`~fantasyportrait_core.drive.direction.baseline_features` on ``ref``, the image the faces were
    found in). Drivers come back unchanged (the same objects) when no direction changes anything.

    Raises:
        InputError: keys or a neutral frame outside the ``num_frames`` generated frames.
    """
    from fantasyportrait_core.drive.direction import baseline_features, direct
    from fantasyportrait_core.drive.performance import performance_paths, save_performance

    if job.save_expression and _writer(models):
        paths = [save_performance(path, d) for path, d in zip(performance_paths(job.save_expression, len(drivers)),
                                                                drivers)]
        report["saved_expressions"] = paths
    directions = plan.directions or []
    if not any(not d.is_identity for d in directions):
        return drivers
    for d in directions:
        d.check(num_frames, f"the {num_frames} generated frames")
    with on_device(models.encoder, job.memory.device):
        baselines = baseline_features(models.encoder, ref, chosen)
    report["direction"] = [{"character": i, "settings": d.describe()} for i, d in enumerate(directions)]
    return [direct(drv, d, b) for drv, d, b in zip(drivers, directions, baselines)]


def _writer(models: Models) -> bool:
    """Whether this process writes the outputs: always, except ranks other than 0 of ``--parallel``."""
    parallel = getattr(models, "parallel", None)
    return parallel is None or parallel.rank == 0


def _write_png(path: str, bgr: np.ndarray):
    """Write a PNG via a temporary file in the same folder (never a half-written preview)."""
    import cv2

    ok, data = cv2.imencode(".png", bgr)
    try:
        if not ok:
            raise OSError("PNG encoding failed")
        with atomic_write(path, ".png") as tmp, open(tmp, "wb") as f:
            f.write(data.tobytes())
    except OSError as e:
        log.warning("[FantasyPortrait] could not write the face preview %s (%s)", path, e)


def prepare_model(models: Models, job: Job, width: int, height: int, num_frames: int, people: int,
                  sampling=None):
    """Assemble the model for the job's device: apply fast mode (fp8 matmul), compile and the attention
    backend once, then plan this job
    (:func:`~fantasyportrait_core.runtime.memory.plan_sampling`): one pass or windows (--long-video), guidance
    passes per forward, and block offload (diffusers group offload, next block on a side CUDA stream)
    when the plan needs it. Returns ``(window, plan)``: window in pixel frames (``None``: one pass)."""
    from fantasyportrait_core.runtime.assemble import set_speed_options, weight_storage
    from fantasyportrait_core.runtime.memory import measured_size, plan_sampling
    from fantasyportrait_core.runtime.residency import available_ram_bytes, enable_block_offload, free_vram_bytes
    from fantasyportrait_core.sampling.guidance import guidance_passes

    m = job.memory
    sampling = sampling or job.sampling.resolve()
    tr, device = models.transformer, torch.device(m.device)
    if not getattr(models, "_speed_set", False):
        speed = set_speed_options(tr, device, m.attention, fast=m.fast, compile=m.compile)
        log.info("[FantasyPortrait] model: %s", ", ".join(speed.notes))
        models._speed_set = True
    storage = weight_storage(tr)
    offload = "block" if getattr(models, "_offloaded", False) else m.offload
    passes, parallel = guidance_passes(sampling.cfg, sampling.portrait_cfg), getattr(models, "parallel", None)
    if parallel is not None and parallel.mode == "cfg":  # this rank's share of the passes
        passes = parallel.share(sorted(passes, key=lambda p: not p[1])) or passes[:1]
    shards = parallel.world if parallel is not None and parallel.mode == "sequence" else 1
    window, plan = plan_sampling(measured_size(tr, models.adapter), width, height, num_frames,
                                 free_vram_bytes(device), passes, people,
                                 storage, offload, m.long_video, m.context_frames, m.window_anchor == "reference",
                                 shards=shards)
    if shards > 1:
        from fantasyportrait_core.runtime.memory import tokens_per_forward

        frames = num_frames if window is None else min(num_frames, window + 4 * (m.window_anchor == "reference"))
        parallel.check_tokens(tokens_per_forward(width, height, frames), f"{width}x{height}, {frames} frames")
    log.info("[FantasyPortrait] %s", plan.describe())
    if plan.offload == "block" and device.type == "cuda" and not getattr(models, "_offloaded", False):
        enable_block_offload(tr, device, available_ram_bytes(), adapter=models.adapter)
        if getattr(models, "transformer_2", None) is not None:  # Wan2.2: the low-noise expert streams the same way
            enable_block_offload(models.transformer_2, device, available_ram_bytes(), adapter=models.adapter)
        models._offloaded = True
    return window, plan


def oom_message(job: Job) -> str:
    """The out-of-GPU-memory advice for ``job`` in the CLI's option names (:func:`~fantasyportrait_core.runtime.memory.oom_advice`)."""
    tried = (f"--max-size {job.max_size}, --frames {job.frames}, --context-frames {job.memory.context_frames}"
             f"{', --fp8' if job.memory.fp8 else ''}")
    return oom_advice(tried, CLI_KNOBS, job.memory.fp8)


def run_job(job: Job, models: Models | None = None, plan: RunPlan | None = None, stop=None) -> dict:
    """Run one job end to end: validate (:func:`~fantasyportrait_core.runtime.plan.plan_run`, unless ``plan``
    is given), build the models when none are given (real checkpoints, else the tiny random model),
    apply the job's LoRAs, animate and write ``job.out``. ``stop``: see :func:`animate`.

    Returns:
        The report dict of :func:`animate` (with ``loras`` when any were applied); ``output`` is
        ``None`` when the video could not be written (the frames are in ``fallback``).
    Raises:
        InputError / FileNotFoundError: bad input, before any model is built.
    """
    plan = plan or plan_run(job)
    if models is None:
        if not plan.real:
            print("RANDOM WEIGHTS: no checkpoints given, using a tiny random model (output is not a real animation).")
        models = real_models(job) if plan.real else tiny_random_models(job.sampling.seed)
    if job.loras and getattr(models, "transformer_2", None) is not None:
        raise InputError("--lora on Wan2.2 experts is not supported (each expert needs its own LoRA); drop --lora")
    if models.loras is None:  # once per model: the demo's jobs share one
        models.loras = apply_lora_specs(models.transformer, job.loras) if job.loras else []
    report = animate(models, read_image(plan.image), plan, job, stop=stop)
    if models.loras:
        report["loras"] = models.loras
    return report


__all__ = ["Models", "animate", "apply_lora_specs", "direct_drivers", "init_latent_from_video", "oom_message",
           "prepare_model", "real_models", "run_job", "tiny_random_models", "tiny_random_wan22_models", "tqdm_progress"]

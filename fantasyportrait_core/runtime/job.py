"""One typed description of a generation job, validated once.

:class:`SamplingOptions` (steps, shift, guidance, sampler, preset, schedule, denoise, guidance
intervals) is what every host (CLI ``run``/``demo``, the Sampler node, the benchmarks) hands the
core; :meth:`SamplingOptions.resolve` applies a preset (e.g. lightx2v: its sampler, schedule and
cfg 1) once and builds the per-step :class:`~fantasyportrait_core.sampling.guidance.GuidanceSchedule` once
per run. :class:`Job` adds the inputs (reference image, driving videos or saved performances,
output), face options, directions (``--strength``/``--motion``, :mod:`.direction`), memory choices
and checkpoints. :data:`BOUNDS` is the one table of numeric bounds; :func:`check_numbers` checks a
job against it naming each value the way its host spells it.

The CLI builds a :class:`Job` from its arguments (:func:`fantasyportrait_core.cli.job_from_args`);
:func:`fantasyportrait_core.runtime.runner.run_job` runs one end to end.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from fantasyportrait_core.validate import InputError, check_float, check_int

# name -> (low, high, low_open, fix): the one set of numeric bounds of a job.
BOUNDS = {
    "frames": (1, 100_000, False, "the number of frames to generate, e.g. 81"),
    "steps": (1, 1000, False, "30 is the reference setting, 4-8 with a distilled LoRA"),
    "max_size": (64, 4096, False, "the longest side of the output in pixels, e.g. 720"),
    "cfg": (0.0, 30.0, False, "1 switches text guidance off (the reference setting)"),
    "portrait_cfg": (0.0, 30.0, False, "the reference uses 4; <= 1 is off"),
    "portrait_scale": (0.0, 10.0, False, "1 is the reference strength"),
    "shift": (0.0, 100.0, True, "the reference uses 5"),
    "seed": (0, 2**64 - 1, False, ""),
    "smooth": (0.0, 20.0, False, "0 (off) or about 1 frame"),
    "context_frames": (5, 100_000, False, "the window length in frames, 81 as Wan2.1 was trained on"),
}
_INTS = {"frames", "steps", "max_size", "seed", "context_frames"}


def cli_name(name: str) -> str:
    """``portrait_cfg`` -> ``--portrait-cfg``: how the CLI spells a job field in its messages."""
    return "--" + name.replace("_", "-")


def widget_range(name: str, step: float | None = None) -> dict:
    """``{"min": ..., "max": ...}`` of a node widget for :data:`BOUNDS` ``[name]``, so a node accepts exactly
    what the CLI accepts (an open lower bound becomes ``low + step``)."""
    lo, hi, lo_open, _ = BOUNDS[name]
    if lo_open:
        lo = lo + (step or 0.01)
    return {"min": lo, "max": hi}


def check_bound(name: str, value, label: str | None = None):
    """``value`` checked against :data:`BOUNDS` ``[name]``; ``label`` names it in the error.

    Raises:
        InputError: one line naming ``label``, the value, the bounds and the fix.
    """
    lo, hi, lo_open, fix = BOUNDS[name]
    label = label or name
    if name in _INTS:
        return check_int(label, value, lo, hi, fix=fix)
    return check_float(label, value, lo, hi, lo_open=lo_open, fix=fix)


@dataclass
class ResolvedSampling:
    """Sampling options after the preset: what one run samples with.

    Attributes:
        sampler: solver name (:data:`~fantasyportrait_core.sampling.flow.SAMPLERS`).
        cfg, portrait_cfg: guidance scales (the preset's cfg when one is set).
        schedule: float32 sigmas ``[steps + 1]`` from <= 1 down to 0.
        guidance: the per-step :class:`~fantasyportrait_core.sampling.guidance.GuidanceSchedule`.
    """

    sampler: str
    cfg: float
    portrait_cfg: float
    schedule: torch.Tensor
    guidance: object

    @property
    def steps(self) -> int:
        """Sampling steps (model evaluations per guidance pass)."""
        return len(self.schedule) - 1


@dataclass
class SamplingOptions:
    """How to sample (paper Sec. 3.4 dual guidance; Wan2.1 flow matching schedule).

    Attributes:
        steps, shift: schedule when neither ``sigmas`` nor ``preset`` is given.
        cfg, portrait_cfg: text and portrait guidance (1 / <= 1: off, as the reference).
        portrait_scale: portrait branch strength in the DiT (1 = reference).
        seed: noise seed.
        sampler: :data:`~fantasyportrait_core.sampling.flow.SAMPLERS`.
        preset: ``None`` or a key of :data:`~fantasyportrait_core.sampling.flow.PRESETS` (overrides
            steps, shift, sampler and cfg).
        sigmas: explicit sigmas from 1 to 0 (win over steps/shift/preset).
        denoise: fraction of the schedule run (< 1 needs an initial latent).
        cfg_range, portrait_cfg_range: fractions of the steps with that guidance on.
        portrait_scales: ``((start, end, scale), ...)`` per step range.
    """

    steps: int = 30
    cfg: float = 1.0
    portrait_cfg: float = 4.0
    portrait_scale: float = 1.0
    shift: float = 5.0
    seed: int = 42
    sampler: str = "euler"
    preset: str | None = None
    sigmas: list[float] | None = None
    denoise: float = 1.0
    cfg_range: tuple[float, float] = (0.0, 1.0)
    portrait_cfg_range: tuple[float, float] = (0.0, 1.0)
    portrait_scales: tuple = ()

    def resolve(self) -> ResolvedSampling:
        """Apply the preset and build the schedule and guidance schedule, once per run.

        Raises:
            ValueError: an unknown preset or sampler, bad sigmas, guidance ranges or step ranges.
        """
        from fantasyportrait_core.sampling.flow import PRESETS, SAMPLERS, schedule_sigmas
        from fantasyportrait_core.sampling.guidance import GuidanceSchedule

        sampler, cfg = self.sampler, self.cfg
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ValueError(f"preset '{self.preset}' is unknown; choose one of none, {', '.join(PRESETS)}")
            sampler, cfg = PRESETS[self.preset].sampler, PRESETS[self.preset].cfg
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler '{sampler}' is unknown; choose one of {', '.join(SAMPLERS)}")
        schedule = schedule_sigmas(self.steps, self.shift, self.denoise, self.sigmas, self.preset)
        guidance = GuidanceSchedule(schedule, cfg, self.portrait_cfg, self.cfg_range, self.portrait_cfg_range,
                                    self.portrait_scales)
        return ResolvedSampling(sampler, cfg, self.portrait_cfg, schedule, guidance)


@dataclass
class MemoryOptions:
    """Where and how the model runs.

    Attributes:
        device: torch device string (``cuda``, ``cuda:1``, ``cpu``).
        dtype: compute dtype key of :data:`~fantasyportrait_core.model.build.DTYPES`.
        fp8: store transformer weights in fp8 (bf16 compute); fast: fp8 matmul (implies fp8).
        compile: ``torch.compile`` the repeated blocks; attention: backend name.
        offload: ``auto`` (memory plan), ``none`` or ``block``.
        long_video: ``auto``, ``one_pass``, ``windows`` or a window preset (``flashportrait``: replaced
            on construction by windows of 201/120 frames with the ``flashportrait`` anchor,
            :func:`~fantasyportrait_core.sampling.windows.window_preset`).
        context_frames, context_overlap: window length and overlap in pixel frames.
        window_anchor: ``reference``, ``none`` or ``flashportrait``.
    """

    device: str = "cpu"
    dtype: str = "bf16"
    fp8: bool = False
    fast: bool = False
    compile: bool = False
    attention: str = "sdpa"
    offload: str = "auto"
    long_video: str = "auto"
    context_frames: int = 81
    context_overlap: int = 16
    window_anchor: str = "reference"

    def __post_init__(self):
        from fantasyportrait_core.sampling.windows import window_preset

        self.long_video, self.context_frames, self.context_overlap, self.window_anchor = window_preset(
            self.long_video, self.context_frames, self.context_overlap, self.window_anchor)


@dataclass
class Job:
    """One generation: inputs, face options, sampling, directions, memory and checkpoints.

    Attributes:
        image: reference image path; driving: driving video paths (or empty with ``expression``);
        expression: saved performance paths (``--expression``); out: output video path.
        people: people per driving video (``None``: one each); frames: most frames (floored to 4k+1);
        max_size: longest output side (px); fps: output rate (``None``: the first driver's).
        prompt, negative_prompt: text (``None`` negative: the default negative prompt).
        detector, detector_dir, landmark_filter, smooth, assign: face options;
        face_order: parsed face numbers per character or ``None``.
        sampling: :class:`SamplingOptions`; memory: :class:`MemoryOptions`; loras: ``FILE[:STRENGTH]``.
        init_video: video to start from when the schedule starts below sigma 1.
        strength, strength_keys, motion, neutral_frame: direction specs (:mod:`.direction`);
        save_expression: where to save the encoded performances.
        expression_speed/loop/start/end: retiming of saved performances.
        transformer, wan_dir, adapter, pd_fpg: checkpoints; tiny_random: use the tiny random model.
        transformer_2: EXPERIMENTAL Wan2.2-I2V-A14B: the low-noise expert (``transformer`` is then the
            high-noise one; a diffusers Wan2.2 ``wan_dir`` with ``transformer_2/`` works without it);
        boundary, adapter_on: the expert switch (``t >= boundary·1000``: high-noise expert) and which
            experts get the portrait branch (:mod:`fantasyportrait_core.sampling.experts`).
    """

    image: str = ""
    driving: list[str] = field(default_factory=list)
    out: str = ""
    expression: list[str] = field(default_factory=list)
    people: list[int] | None = None
    frames: int = 81
    max_size: int = 720
    fps: float | None = 25.0
    prompt: str = ""
    negative_prompt: str | None = None
    detector: str = "auto"
    detector_dir: str | None = None
    landmark_filter: str = "one_euro"
    smooth: float = 0.0
    assign: str = "left_to_right"
    face_order: list[int] | None = None
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    loras: list[str] = field(default_factory=list)
    init_video: str | None = None
    strength: list[str] = field(default_factory=list)
    strength_keys: list[str] = field(default_factory=list)
    motion: list[str] = field(default_factory=list)
    neutral_frame: list[str] = field(default_factory=list)
    save_expression: str | None = None
    expression_speed: float = 1.0
    expression_loop: str = "none"
    expression_start: int = 0
    expression_end: int = 0
    transformer: str | None = None
    wan_dir: str | None = None
    adapter: str | None = None
    pd_fpg: str | None = None
    tiny_random: bool = False
    transformer_2: str | None = None
    boundary: float = 0.9
    adapter_on: str = "both"

    def replace(self, **changes) -> "Job":
        """A copy with ``changes`` (e.g. another image, drivers and output for the demo's second job)."""
        return dataclasses.replace(self, **changes)


def check_numbers(job: Job, label=cli_name) -> None:
    """Every numeric option of ``job`` against :data:`BOUNDS`, then the options that depend on
    each other (overlap below the window), the device and the detector files.

    Raises:
        InputError: one line naming the option (``label(field)``), the value and the fix.
    """
    s, m = job.sampling, job.memory
    for name, value in (("frames", job.frames), ("steps", s.steps), ("max_size", job.max_size), ("cfg", s.cfg),
                        ("portrait_cfg", s.portrait_cfg), ("portrait_scale", s.portrait_scale), ("shift", s.shift),
                        ("seed", s.seed), ("smooth", job.smooth), ("context_frames", m.context_frames)):
        check_bound(name, value, label(name))
    check_int(label("context_overlap"), m.context_overlap, 0, m.context_frames - 1,
              fix=f"frames shared by neighbouring windows, less than {label('context_frames')} ({m.context_frames})")
    if str(m.device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"{label('device')} {m.device}: torch sees no CUDA GPU here; use {label('device')} cpu "
                         f"(slow) or install a CUDA build of torch")
    try:
        torch.device(m.device)
    except (RuntimeError, TypeError):
        raise InputError(f"{label('device')} '{m.device}' is not a torch device; use cuda, cuda:1 or cpu") from None
    from fantasyportrait_core.faces.detect import check_detector_files

    check_detector_files(job.detector, job.detector_dir, label("detector_dir"))


__all__ = ["BOUNDS", "Job", "MemoryOptions", "ResolvedSampling", "SamplingOptions", "check_bound", "check_numbers",
           "cli_name"]

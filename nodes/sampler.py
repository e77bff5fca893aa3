"""FantasyPortrait sampler node: native Wan I2V CONDITIONING + LATENT in, LATENT out."""

from __future__ import annotations

import contextlib
import copy
import logging
import time

import numpy as np
import torch

from fantasyportrait_core.sampling import generate
from fantasyportrait_core.drive.condition import portrait_condition
from fantasyportrait_core.drive.encode import frames_for
from fantasyportrait_core.faces.layout import ReferenceLayout, reference_layout
from fantasyportrait_core.model.attention import TEXT_CONTEXT_TOKENS
from fantasyportrait_core.sampling.windows import ANCHORS, CONTEXT_MODES, window_preset
from fantasyportrait_core.sampling.experts import (ADAPTER_ON, EXPERIMENTAL, WAN22_I2V_BOUNDARY, Expert, ExpertPair,
                                                   check_expert_options)
from fantasyportrait_core.model.denoiser import I2VConditioning
from fantasyportrait_core.faces.face import Face
from fantasyportrait_core.runtime.job import SamplingOptions, widget_range
from fantasyportrait_core.model.geometry import VAE_SPATIAL_STRIDE, pixel_frames
from fantasyportrait_core.weights.lora_apply import apply_loras
from fantasyportrait_core.runtime.memory import (GIB, NODE_KNOBS, activation_bytes, measured_size, module_bytes, oom_advice,
                                                plan_sampling)
from fantasyportrait_core.model.build import denormalize_latent, normalize_latent
from fantasyportrait_core.runtime.restore import restored
from fantasyportrait_core.sampling.flow import DEFAULT_SHIFT, DEFAULT_STEPS, PRESETS, SAMPLER_HELP, SAMPLERS
from fantasyportrait_core.sampling.guidance import guidance_passes, parse_step_ranges
from fantasyportrait_core.validate import InputError

from . import host, residency

log = logging.getLogger("FantasyPortrait")


def center_crop_map(src_w: int, src_h: int, dst_w: int, dst_h: int):
    """Scale and offset taking reference pixels to generated pixels, for the centre crop that
    ``WanImageToVideo`` applies to its start image (``common_upscale(..., "center")``).

    Returns ``(scale, off_x, off_y)`` with ``dst = (src - off) * scale``.
    """
    if src_w / src_h > dst_w / dst_h:  # wider: crop left/right
        crop_w = src_h * dst_w / dst_h
        return dst_h / src_h, (src_w - crop_w) / 2, 0.0
    crop_h = src_w * dst_h / dst_w
    return dst_w / src_w, 0.0, (src_h - crop_h) / 2


def map_face(face: Face, scale: float, off_x: float, off_y: float) -> Face:
    off = np.array([off_x, off_y])
    box = (face.box.reshape(2, 2) - off) * scale
    return Face(box.reshape(4), (face.landmarks - off) * scale, face.score, face.embedding)


def map_mask(mask: torch.Tensor, scale: float, off_x: float, off_y: float, dst_w: int, dst_h: int) -> torch.Tensor:
    """Crop and resize a reference-size mask ``[T, H, W]``/``[H, W]`` to the generated size."""
    m = mask[None] if mask.ndim == 2 else mask
    x0, y0 = int(round(off_x)), int(round(off_y))
    w, h = int(round(dst_w / scale)), int(round(dst_h / scale))
    m = m[:, y0:y0 + h, x0:x0 + w].float()
    return torch.nn.functional.interpolate(m[:, None], size=(dst_h, dst_w), mode="nearest")[:, 0]


def portrait_layout(portrait, width: int, height: int, num_frames: int) -> ReferenceLayout:
    """Per-character regions and latent person map of FP_PORTRAIT at the generated size: faces and
    user masks are taken from reference pixels through WanImageToVideo's centre crop
    (:func:`center_crop_map`), then :func:`fantasyportrait_core.faces.layout.reference_layout`. Used by this
    sampler and by the patch on ComfyUI's own Wan MODEL (``nodes/native.py``)."""
    scale, ox, oy = center_crop_map(portrait.ref_width, portrait.ref_height, width, height)
    faces = [map_face(f, scale, ox, oy) for f in portrait.faces]
    masks = [None if m is None else map_mask(m, scale, ox, oy, width, height) for m in portrait.user_masks]
    return reference_layout(faces, portrait.drivers, width, height, num_frames, masks or None)


def conditioning_parts(positive, negative, cfg: float, clip_required: bool = True):
    """Text embeddings, CLIP image tokens and the 20-channel image condition from native Wan I2V
    CONDITIONING (as produced by ``WanImageToVideo``).

    ``clip_required=False`` (Wan2.2-I2V-A14B: no CLIP image branch): no CLIP image tokens are needed;
    the image tokens returned are then ``None``.

    Raises:
        ValueError: naming the node to connect when a part is missing.
    """
    if not positive or not isinstance(positive[0], (list, tuple)):
        raise InputError("positive must be CONDITIONING (e.g. CLIPTextEncode → WanImageToVideo)")
    text_pos, extra = positive[0][0], positive[0][1]
    if "concat_latent_image" not in extra:
        raise InputError("positive has no reference image latent: connect WanImageToVideo (with start_image = the "
                         "reference portrait) between the text encoders and this sampler")
    clip = extra.get("clip_vision_output") if clip_required else None
    if clip is None and clip_required:
        raise InputError("positive has no CLIP image embedding: connect CLIPVisionEncode (clip_vision_h) to "
                         "WanImageToVideo's clip_vision_output; Wan2.1 I2V needs it")
    image_ctx = None if clip is None else (clip["penultimate_hidden_states"] if isinstance(clip, dict)
                                           else clip.penultimate_hidden_states)
    text_neg = negative[0][0] if (negative and cfg != 1.0) else None
    if cfg != 1.0 and text_neg is None:
        raise InputError("cfg != 1 needs a negative CONDITIONING")
    host.check_finite(text_pos, "positive (text embedding)", "check the text encoder and its model file")
    if text_neg is not None:
        host.check_finite(text_neg, "negative (text embedding)", "check the text encoder and its model file")
    if image_ctx is not None:
        host.check_finite(image_ctx, "positive (CLIP vision embedding)", "check CLIPVisionEncode and its model file")
    host.check_finite(extra["concat_latent_image"], "positive (reference image latent)",
                      "check the start_image and the VAE of WanImageToVideo")

    def fit(t):
        if t.shape[1] > TEXT_CONTEXT_TOKENS:
            log.warning("[FantasyPortrait] prompt has %d tokens; Wan uses the first %d", t.shape[1], TEXT_CONTEXT_TOKENS)
            t = t[:, :TEXT_CONTEXT_TOKENS]
        return t

    latent_image = normalize_latent(extra["concat_latent_image"].float())
    mask = extra.get("concat_mask")
    t = latent_image.shape[2]
    if mask is None:
        keep = torch.zeros(1, 1, t, *latent_image.shape[-2:])
        keep[:, :, 0] = 1.0
    else:
        keep = 1.0 - mask.float().mean(dim=1, keepdim=True)[:1]  # ComfyUI: 0 = given frame
        keep = keep[:, :, :t]
        if keep.shape[2] < t:
            keep = torch.nn.functional.pad(keep, (0, 0, 0, 0, 0, t - keep.shape[2]))
    y = torch.cat([keep.repeat(1, 4, 1, 1, 1), latent_image[:1]], dim=1)
    return fit(text_pos), (fit(text_neg) if text_neg is not None else None), image_ctx, y


class FantasyPortraitSampler:
    """Flow-matching sampler with the portrait branch and dual guidance."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("FANTASYPORTRAIT_MODEL", {"tooltip": "From FantasyPortrait Model Loader."}),
            "portrait": ("FP_PORTRAIT", {"tooltip": "From FantasyPortrait Conditioning."}),
            "positive": ("CONDITIONING", {"tooltip": "From WanImageToVideo (text + reference image + CLIP)."}),
            "negative": ("CONDITIONING", {"tooltip": "From WanImageToVideo; used only when cfg != 1."}),
            "latent": ("LATENT", {"tooltip": "From WanImageToVideo: sets size and length (frames = 4k+1)."}),
            "seed": ("INT", {"default": 42, **widget_range("seed"), "control_after_generate": True,
                             "tooltip": "Noise seed; the same seed gives the same video on any device."}),
            "steps": ("INT", {"default": DEFAULT_STEPS, **widget_range("steps"),
                              "tooltip": "Sampling steps (reference: 30)."}),
            "cfg": ("FLOAT", {"default": 1.0, **widget_range("cfg"), "step": 0.1,
                              "tooltip": "Text guidance; 1 = off (the reference setting, saves a pass)."}),
            "portrait_cfg": ("FLOAT", {"default": 4.0, **widget_range("portrait_cfg"), "step": 0.1,
                                       "tooltip": "Portrait guidance; 1 or less = off (as the reference). The reference "
                                                  "uses 4."}),
            "shift": ("FLOAT", {"default": DEFAULT_SHIFT, **widget_range("shift", 0.1), "step": 0.1,
                                "tooltip": "Flow-matching sigma shift (reference: 5)."}),
            "context_frames": ("INT", {"default": 81, **widget_range("context_frames"), "step": 4, "tooltip":
                                       "Window length when a long video is denoised in overlapping windows "
                                       "(see long_video; Wan2.1 is trained on 81)."}),
            "context_overlap": ("INT", {"default": 16, "min": 4, "max": 80, "step": 4, "tooltip":
                                        "Frames shared by neighbouring windows, blended linearly."}),
        }, "optional": {
            "sampler": (list(SAMPLERS), {"default": "euler", "tooltip": "; ".join(
                f"{k}: {v}" for k, v in SAMPLER_HELP.items()) + ". UniPC or DPM++ 2M reach Euler's quality in fewer "
                "steps."}),
            "preset": (["none", *PRESETS], {"default": "none", "tooltip": "lightx2v: the schedule lightx2v's step-"
                       "distill LoRA was made for (4 steps at timesteps 1000/750/500/250, shift 5, lcm sampler, "
                       "cfg 1); it overrides steps, shift, sampler and cfg. Use with that LoRA."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip":
                                  "Below 1 the latent input is kept partly: sampling starts from it at a lower noise "
                                  "level (video-to-video). 1 = start from pure noise."}),
            "cfg_start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                    "Text cfg applies from this fraction of the steps on (0 = first step)."}),
            "cfg_end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                  "...up to this fraction (1 = last step); outside, cfg is 1 and its pass is skipped."}),
            "portrait_cfg_start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                             "Portrait cfg applies from this fraction of the steps on."}),
            "portrait_cfg_end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                           "...up to this fraction; outside, portrait guidance is off (one pass "
                                           "less per step)."}),
            "portrait_scale_steps": ("STRING", {"default": "", "tooltip":
                                                "Portrait scale per range of steps, e.g. '0-0.5:1.2, 0.5-1:0.8' "
                                                "(fractions of the steps: value). Steps in no range keep the "
                                                "Conditioning node's portrait scale."}),
            "sigmas": ("SIGMAS", {"tooltip": "Explicit schedule from any native sigma node (flow sigmas, 1 → 0); "
                                  "overrides steps, shift and the preset's schedule."}),
            "long_video": (list(CONTEXT_MODES), {"default": "auto", "tooltip":
                           "auto: the whole video in one pass, as the reference, when it fits in the free memory "
                           "(201 frames at 720x416 take ~6.5 GB on top of the weights), else windows of "
                           "context_frames. one_pass: always one pass. windows: always windows. flashportrait: "
                           "FlashPortrait's windows (51 latent frames = 201, overlap 30 = 120, blended window after "
                           "window, every window conditioned on the reference; overrides context_frames, "
                           "context_overlap and window_anchor)."}),
            "window_anchor": (list(ANCHORS), {"default": "reference", "tooltip":
                              "reference: every window after the first also sees the first frame with the "
                              "reference image as its condition, as in training (keeps the identity; ~5 % more "
                              "work per window). none: later windows see no reference. flashportrait: every "
                              "window is conditioned like the first (reference at its own first frame), as "
                              "FlashPortrait."}),
            "boundary": ("FLOAT", {"default": WAN22_I2V_BOUNDARY, "min": 0.01, "max": 0.99, "step": 0.005, "tooltip":
                         "EXPERIMENTAL, Wan2.2-I2V-A14B only (Model Loader with transformer_2): the high-noise expert "
                         "runs while the timestep is at or above boundary x 1000, then the low-noise one (Wan2.2 "
                         "I2V: 0.900). The adapter was trained on Wan2.1; quality on Wan2.2 not measured."}),
            "adapter_on": (list(ADAPTER_ON), {"default": "both", "tooltip":
                           "EXPERIMENTAL, Wan2.2-I2V-A14B only: which experts run the portrait branch (both, only "
                           "the high-noise one, or only the low-noise one); the other runs plain Wan2.2."}),
        }}

    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("latent", "info")
    OUTPUT_TOOLTIPS = ("The sampled Wan2.1 video latent (decode with VAE Decode).",
                       "What ran: the model options and the memory plan (storage, offload, guidance passes per "
                       "forward, predicted peak vs free VRAM), and the sampling time.")
    FUNCTION = "sample"
    CATEGORY = "FantasyPortrait"
    DESCRIPTION = ("Samples a Wan2.1 image-to-video latent animated by the portrait's expressions, with text and "
                   "portrait guidance. Long videos run in one pass when they fit in memory (as the reference), "
                   "else in overlapping windows anchored on the reference image. Decode with the native VAE Decode.")

    @classmethod
    def VALIDATE_INPUTS(cls, context_frames=None, context_overlap=None):
        """Checked when the prompt is queued. Taking these inputs turns off ComfyUI's own min/max check
        for them, so their limits are checked here too (a linked value arrives as None)."""
        spec = FantasyPortraitSampler.INPUT_TYPES()["required"]
        for name, value in (("context_frames", context_frames), ("context_overlap", context_overlap)):
            lo, hi = spec[name][1]["min"], spec[name][1]["max"]
            if value is not None and not lo <= value <= hi:
                return f"{name} must be between {lo} and {hi}, got {value}"
        if context_frames is not None and context_overlap is not None and context_overlap >= context_frames:
            return (f"context_overlap ({context_overlap}) must be less than context_frames ({context_frames}); "
                    f"lower the overlap")
        return True

    def sample(self, model, portrait, positive, negative, latent, seed, steps=DEFAULT_STEPS, cfg=1.0,
               portrait_cfg=4.0, shift=DEFAULT_SHIFT, context_frames=81, context_overlap=16, sampler="euler",
               preset="none", denoise=1.0, cfg_start=0.0, cfg_end=1.0, portrait_cfg_start=0.0, portrait_cfg_end=1.0,
               portrait_scale_steps="", sigmas=None, long_video="auto", window_anchor="reference",
               boundary=WAN22_I2V_BOUNDARY, adapter_on="both"):
        samples = host.check_latent(latent, "latent")
        msg = self.VALIDATE_INPUTS(context_frames, context_overlap)
        if msg is not True:
            raise InputError(msg)
        long_video, context_frames, context_overlap, window_anchor = window_preset(
            long_video, context_frames, context_overlap, window_anchor)  # e.g. FlashPortrait's 51/30 windows
        preset = None if preset in (None, "none") else preset
        if preset is not None and preset in PRESETS and cfg != PRESETS[preset].cfg:
            log.info("[FantasyPortrait] preset %s: cfg %s -> %s", preset, cfg, PRESETS[preset].cfg)
        try:  # one job description: the preset applied and the guidance schedule built once per run
            resolved = SamplingOptions(steps, cfg, portrait_cfg, 1.0, shift, seed, sampler, preset, sigmas, denoise,
                                       (cfg_start, cfg_end), (portrait_cfg_start, portrait_cfg_end),
                                       parse_step_ranges(portrait_scale_steps, "portrait_scale_steps")).resolve()
        except InputError:
            raise
        except ValueError as e:
            raise InputError(str(e)) from None
        sampler, cfg, schedule = resolved.sampler, resolved.cfg, resolved.schedule
        f_lat, h, w = samples.shape[2:]
        num_frames, width, height = pixel_frames(f_lat), w * VAE_SPATIAL_STRIDE, h * VAE_SPATIAL_STRIDE
        if width % 16 or height % 16:
            raise InputError(f"latent is {width}x{height} pixels; Wan needs multiples of 16: set WanImageToVideo "
                             f"width and height to multiples of 16")
        if not portrait.drivers:
            raise InputError("portrait holds no character; connect FantasyPortrait Conditioning")
        shortest = min(d.num_frames for d in portrait.drivers)
        if shortest < num_frames:
            raise InputError(f"the latent is {num_frames} frames long but a driving expression has only {shortest}; "
                             f"set WanImageToVideo length to at most {frames_for(portrait.drivers)}")
        low = getattr(model, "low_noise", None)
        if low is not None:
            try:
                check_expert_options(boundary, adapter_on)
            except ValueError as e:
                raise InputError(str(e)) from None
            if model.loras or low.loras:
                raise InputError("FantasyPortrait LoRA on Wan2.2 experts is not supported (each expert needs its own "
                                 "LoRA): use the native graph (LoraLoaderModelOnly on each expert) or no LoRA")
        text_pos, text_neg, image_ctx, y = conditioning_parts(positive, negative, cfg, clip_required=low is None)
        tc = model.transformer.config
        if text_pos.shape[-1] != tc.text_dim:
            raise InputError(f"positive text embeddings are {text_pos.shape[-1]}-wide but the transformer takes "
                             f"{tc.text_dim}: encode the prompt with the Wan umT5-XXL text encoder (CLIPLoader type wan)")
        if image_ctx is not None and tc.image_dim is None:
            image_ctx = None  # Wan2.2 experts have no CLIP image branch: a CLIP input is not used
        if image_ctx is not None and image_ctx.shape[-1] != tc.image_dim:
            raise InputError(f"the CLIP vision embedding is {image_ctx.shape[-1]}-wide but the transformer takes "
                             f"{tc.image_dim}: use clip_vision_h in CLIPVisionLoader")
        if y.shape[2:] != samples.shape[2:]:
            raise InputError(f"reference latent {tuple(y.shape[2:])} and latent {tuple(samples.shape[2:])} differ: "
                             "take both from the same WanImageToVideo")

        layout = portrait_layout(portrait, width, height, num_frames)

        device = host.torch_device()
        tr = model.transformer
        passes = guidance_passes(cfg, portrait_cfg)  # the most passes a step runs (guidance intervals skip some)
        apply_loras(tr, model.loras)  # exactly this model's LoRAs (none: any earlier ones are removed)
        if low is not None:
            apply_loras(low.transformer, ())
        size = measured_size(tr, model.adapter)  # Wan2.2: one expert (the one on the device) at a time
        window, plan = self.plan(model, size, device, width, height, num_frames, passes, len(portrait.drivers),
                                 long_video, context_frames, window_anchor == "reference")
        log.info("[FantasyPortrait] %s", plan.describe())
        experts = None
        if low is None:
            self.place(model, size, plan, device)
        else:
            by_name = {"high": model, "low": low}
            experts = ExpertPair(Expert("high", tr, model.state), Expert("low", low.transformer, low.state), boundary,
                                 adapter_on, on_switch=lambda out, into: self.place(by_name[into], size, plan, device))
            log.warning("[FantasyPortrait] Wan2.2-I2V-A14B, adapter on %s expert(s): %s", adapter_on, EXPERIMENTAL)
        pbar = host.Progress(len(schedule) - 1)
        init = None
        if float(schedule[0]) < 1.0:
            init = normalize_latent(samples[:1].float())
            if not samples.any():
                log.warning("[FantasyPortrait] denoise < 1 on an empty latent (WanImageToVideo's is all zeros): the "
                            "result starts from a grey video; connect a latent with content (e.g. VAE Encode)")

        def callback(info):
            host.check_interrupt()
            pbar.update(info.i + 1, info.denoised)

        start = time.perf_counter()
        try:
            # Whatever happens inside (Cancel, out of memory, an error), the model leaves as it came: no
            # condition attached, processors and hooks as loaded, every weight where it was (offload too).
            with contextlib.ExitStack() as stack:
                for m in (model,) if low is None else (model, low):
                    stack.enter_context(restored(m.transformer, m.state))
                    stack.enter_context(m.home.guard())
                cond = portrait_condition(model.adapter, portrait.drivers, num_frames, layout, portrait.scale)
                i2v = I2VConditioning(text_pos, text_neg, image_ctx, y)
                out = generate.generate_latent(tr, model.state, i2v, cond, num_frames, width, height, seed=seed,
                                               callback=callback, context_frames=window,
                                               context_overlap=context_overlap, window_anchor=window_anchor,
                                               init_latent=init,
                                               batch_passes=plan.batch_passes, device=device, resolved=resolved,
                                               experts=experts)
        except torch.cuda.OutOfMemoryError as e:
            model.resident.detach()
            # Re-raise the very OOM error (ComfyUI's ``model_management.OOM_EXCEPTION``): ComfyUI then
            # unloads every model and shows its OOM tips. What to change goes into its message (shown
            # in the UI), the exception notes (tracebacks) and the log.
            advice = oom_message(tr, width, height, num_frames, context_frames, model.offload, plan.describe(),
                                 model.storage == "fp8")
            log.error("[FantasyPortrait] %s", advice)
            add_advice(e, advice)
            raise
        # The model stays on the GPU for the next prompt; ComfyUI unloads it when it needs the memory.
        context = "one pass" if window is None else f"windows of {window} frames (anchor: {window_anchor})"
        if experts is not None:
            switch = next((sg for sg, name in experts.trace if name == "low"), None)
            context += (f"\nWan2.2 experts (EXPERIMENTAL), adapter on {adapter_on}: high-noise until timestep "
                        f"{boundary * 1000:.0f}, low-noise from sigma {switch if switch is None else round(switch, 4)}")
        info = (f"{model.info}\n{plan.describe()}\n{num_frames} frames: {context}\n"
                f"sampling {time.perf_counter() - start:.1f} s ({len(schedule) - 1} steps)")
        result = copy.copy(latent)
        result["samples"] = denormalize_latent(out).to(samples.dtype)
        return (result, info)

    @staticmethod
    def plan(model, size, device, width, height, num_frames, passes, people, long_video="auto", context_frames=81,
             anchored=True):
        """One pass or windows, and the memory plan for it
        (:func:`fantasyportrait_core.runtime.memory.plan_sampling`) for ``size`` (:func:`measured_size` of
        the model): its storage is fixed; offload follows the loader's setting (``auto``: decided
        here). Returns ``(window, plan)``."""
        offload = "block" if model.offload_active else model.offload
        return plan_sampling(size, width, height, num_frames,
                             residency.vram_available(device, model.resident), passes, people, model.storage,
                             offload, long_video, context_frames, anchored)

    @staticmethod
    def place(model, size, plan, device):
        """Make room and put the weights where the plan says: resident (loaded through ComfyUI's
        model management, which unloads its own models first; no move when already resident) or
        block offload (switched on once; ComfyUI frees what the streamed blocks + activations need)."""
        if device.type != "cuda":
            return
        act = activation_bytes(size, plan.tokens, plan.batch_passes,
                               min(plan.batch_passes, 1), plan.people)
        if plan.offload == "block":
            if not model.offload_active:
                from .loaders import enable_block_offload

                log.info("[FantasyPortrait] switching to block offload for this model (%.1f GiB predicted)",
                         plan.peak_bytes / GIB)
                enable_block_offload(model)
            residency.free_for_offload(device, plan.peak_bytes)
        else:
            residency.load_resident(model.resident, device, act)


def add_advice(error: BaseException, advice: str) -> None:
    """Append ``advice`` to ``error``'s message (``str(error)``, what ComfyUI shows) and to its notes,
    keeping the error object and its type (e.g. ``torch.OutOfMemoryError`` for ComfyUI's OOM
    handling)."""
    first = str(error.args[0]) if error.args else ""
    error.args = (f"{first}\n{advice}" if first else advice, *error.args[1:])
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(advice)


def oom_message(transformer, width: int, height: int, num_frames: int, context_frames: int, offload: str,
                plan: str = "", fp8: bool = False) -> str:
    """:func:`~fantasyportrait_core.runtime.memory.oom_advice` in the nodes' widget names, with the
    numbers that were tried."""
    tried = (f"{module_bytes(transformer) / 2**30:.1f} GiB of transformer weights, {width}x{height}, {num_frames} "
             f"frames, context_frames {context_frames}, offload {offload}{f'; {plan}' if plan else ''}")
    return oom_advice(tried, NODE_KNOBS, fp8)

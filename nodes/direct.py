"""Directing nodes: per-channel strength over time and relative motion on an expression (applied
against the portrait's own face when Conditioning pairs it with that face), and saved performances
(save / load with trim, speed and loop). Core: ``fantasyportrait_core.drive.direction`` and
``fantasyportrait_core.drive.performance``."""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from fantasyportrait_core.drive.encode import DrivingExpression
from fantasyportrait_core.runtime.residency import on_device
from fantasyportrait_core.drive.direction import CHANNELS, MAX_STRENGTH, MOTION_MODES, Direction, Strength, baseline_features
from fantasyportrait_core.drive.direction import parse_keys
from fantasyportrait_core.drive.performance import EXTENSION, LOOP_MODES, load_performance, retime, save_performance
from fantasyportrait_core.validate import InputError
from fantasyportrait_core.media.video import OUTPUT_FPS

from . import host

log = logging.getLogger("FantasyPortrait")

CATEGORY = "FantasyPortrait/direct"
PERFORMANCE_SUBFOLDER = "fantasyportrait_performances"  # in ComfyUI's output (Save) and input folders (Load)

CHANNEL_TIPS = {
    "head_pose": "head pose (rotation and position of the head)",
    "eyes": "eye gaze and blinks",
    "emotion": "emotional expression (brows, cheeks, overall affect)",
    "mouth": "lip motion (mouth shape and opening)",
}


def face_key(face) -> tuple:
    """A reference face named by its box (pixels, 0.01 px), the same for equal faces found again."""
    return tuple(round(float(v), 2) for v in np.asarray(face.box).reshape(-1))


@dataclass
class DirectedExpression(DrivingExpression):
    """A driving expression with directions still to apply: the face it animates is only known when
    Conditioning pairs characters with reference faces, so the portrait's baseline of every reference
    face is computed here and the right one taken there (:func:`resolve_directions`).

    Attributes:
        directions: :class:`~fantasyportrait_core.drive.direction.Direction` objects, applied in order.
        baselines: :func:`face_key` -> float32 ``[554]`` baseline of each reference face.
    """

    directions: tuple = ()
    baselines: dict = field(default_factory=dict, repr=False)


def _plain_fields(d) -> dict:
    return {f.name: getattr(d, f.name) for f in dataclasses.fields(DrivingExpression)}


def resolve_directions(drivers: list, faces: list) -> list:
    """Apply pending directions now that each character's reference face is known.

    Args:
        drivers: characters (``DrivingExpression``, some :class:`DirectedExpression`), in order.
        faces: the face each character animates (same order).
    Returns:
        Plain ``DrivingExpression`` objects (the input objects where nothing was pending).
    Raises:
        InputError: a directed expression whose faces came from another reference image.
    """
    out = []
    for i, (d, face) in enumerate(zip(drivers, faces)):
        if not isinstance(d, DirectedExpression):
            out.append(d)
            continue
        base = d.baselines.get(face_key(face))
        if base is None:
            raise InputError(f"character {i} ({d.label}) was directed against other reference faces: connect the same "
                             f"Face Masks output to Direct Expression's faces and to Conditioning's faces")
        feats = d.features
        for direction in d.directions:
            feats = direction.apply(feats, base)
        out.append(DrivingExpression(**{**_plain_fields(d), "features": feats}))
    return out


def _keys_or_constant(text: str, value: float, name: str) -> Strength:
    text = (text or "").strip()
    return parse_keys(text, name) if text else Strength.constant(value)


class FantasyPortraitDirectExpression:
    """Expression -> the same expression with per-channel strengths (constant or keyframed) and
    absolute/relative motion, against the portrait's own face."""

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "expression": ("FP_EXPRESSION", {"tooltip": "From Encode Expression or Load Performance."}),
            "expression_encoder": ("FP_EXPRESSION_ENCODER", {"tooltip":
                                   "From Expression Encoder Loader: encodes the portrait's own faces (the baseline "
                                   "that strength 0 holds)."}),
            "faces": ("FP_FACES", {"tooltip": "The reference faces, from Face Masks: connect the same output to "
                                              "Conditioning."}),
        }
        for ch in CHANNELS:
            required[ch] = ("FLOAT", {"default": 1.0, "min": 0.0, "max": MAX_STRENGTH, "step": 0.05, "tooltip":
                                      f"Strength of the {CHANNEL_TIPS[ch]}: 1 follows the driver (unchanged), 0 holds "
                                      f"the portrait's own {ch.replace('_', ' ')}"
                                      + (" (0 = the expression without the head motion)" if ch == "head_pose" else "")
                                      + f", up to {MAX_STRENGTH:g} exaggerates."})
        required["motion"] = (list(MOTION_MODES), {"default": "absolute", "tooltip":
                              "absolute: the driver's expression (as the reference). relative: the portrait's own "
                              "expression plus the driver's change since its neutral frame, so a driver who starts "
                              "smiling does not make a neutral portrait smile throughout."})
        required["neutral_frame"] = ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip":
                                     "relative motion: the driver's frame taken as neutral (0 = the first)."})
        optional = {f"{ch}_keys": ("STRING", {"default": "", "tooltip":
                                              f"Optional keyframes for {ch} over the output frames, 'FRAME:S, ...' "
                                              f"(e.g. '0:1, 40:0.3, 80:1'): linear between keys, held before the first "
                                              f"and after the last. Overrides the {ch} slider; empty = use it."})
                    for ch in CHANNELS}
        optional["character"] = ("INT", {"default": -1, "min": -1, "max": 7, "tooltip":
                                 "Which character of this expression to direct (0 = first person of it); -1 = all."})
        return {"required": required, "optional": optional}

    RETURN_TYPES = ("FP_EXPRESSION", "STRING")
    RETURN_NAMES = ("expression", "info")
    OUTPUT_TOOLTIPS = ("The directed expression: connect to Conditioning (applied there against the face each "
                       "character animates). Chain another Direct Expression to direct characters differently.",
                       "What was set for which character.")
    FUNCTION = "direct"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Per-channel strength of the driving expression (head pose, eyes, emotion, mouth), constant or "
                   "keyframed over the output frames, and absolute or relative motion. Strength 0 holds a channel at "
                   "the portrait's own value (its face encoded as driving faces are), 1 changes nothing.")

    @classmethod
    def VALIDATE_INPUTS(cls, head_pose_keys=None, eyes_keys=None, emotion_keys=None, mouth_keys=None):
        """Keys are checked when the prompt is queued (a linked value arrives as None)."""
        for ch, text in zip(CHANNELS, (head_pose_keys, eyes_keys, emotion_keys, mouth_keys)):
            if text and text.strip():
                try:
                    parse_keys(text, f"{ch}_keys")
                except InputError as e:
                    return str(e)
        return True

    def direct(self, expression, expression_encoder, faces, head_pose=1.0, eyes=1.0, emotion=1.0, mouth=1.0,
               motion="absolute", neutral_frame=0, head_pose_keys="", eyes_keys="", emotion_keys="", mouth_keys="",
               character=-1):
        drivers = list(expression or [])
        if not drivers:
            raise InputError("expression holds no character; connect Encode Expression or Load Performance")
        if character >= len(drivers):
            raise InputError(f"character {character}: this expression has {len(drivers)} character(s) (0 to "
                             f"{len(drivers) - 1}); pick one of them or -1 for all")
        values = dict(zip(CHANNELS, (head_pose, eyes, emotion, mouth)))
        keys = dict(zip(CHANNELS, (head_pose_keys, eyes_keys, emotion_keys, mouth_keys)))
        strengths = {ch: _keys_or_constant(keys[ch], values[ch], f"{ch}_keys") for ch in CHANNELS}
        direction = Direction({ch: s for ch, s in strengths.items() if not s.is_one}, motion, int(neutral_frame))
        targets = range(len(drivers)) if character < 0 else [character]
        for i in targets:
            direction.check(drivers[i].num_frames, f"character {i}'s expression ({drivers[i].label})")
        if faces is None or not getattr(faces, "faces", None) or getattr(faces, "image", None) is None:
            raise InputError("faces must come from Face Masks (the reference image and its faces)")
        if direction.is_identity:
            return (drivers, "all channels 1, absolute: the expression is unchanged")
        with on_device(expression_encoder, host.torch_device()):
            base = baseline_features(expression_encoder, faces.image, faces.faces)
        baselines = {face_key(f): b for f, b in zip(faces.faces, base)}
        out = list(drivers)
        for i in targets:
            d = drivers[i]
            if isinstance(d, DirectedExpression):
                out[i] = dataclasses.replace(d, directions=d.directions + (direction,),
                                             baselines={**baselines, **d.baselines})
            else:
                out[i] = DirectedExpression(**_plain_fields(d), directions=(direction,), baselines=baselines)
        info = [f"character {i} ({drivers[i].label}): {direction.describe()}" for i in targets]
        return (out, "\n".join(info))


# ------------------------------------------------------------------------------------------------
# Saved performances


def _output_dir() -> str:
    return host.folder_paths.get_output_directory() if host.folder_paths is not None else os.path.abspath("output")


def performance_files() -> list[str]:
    """Saved performances ComfyUI can offer: ``*.safetensors`` in the input folder and its
    ``fantasyportrait_performances`` subfolder, and (marked ``[output]``) the ones Save Performance
    wrote to the output folder's ``fantasyportrait_performances``."""
    fp = host.folder_paths
    if fp is None:
        return []
    found = []
    for base, mark in ((fp.get_input_directory(), ""), (fp.get_output_directory(), " [output]")):
        roots = [base, os.path.join(base, PERFORMANCE_SUBFOLDER)] if not mark else [os.path.join(base, PERFORMANCE_SUBFOLDER)]
        for root in roots:
            for path in sorted(glob.glob(os.path.join(glob.escape(root), "*" + EXTENSION))):
                found.append(os.path.relpath(path, base).replace(os.sep, "/") + mark)
    return found


def performance_path(name: str) -> str:
    """The file behind a :func:`performance_files` entry (or a plain path outside ComfyUI)."""
    fp = host.folder_paths
    if fp is None or os.path.isabs(name):
        return name
    return fp.get_annotated_filepath(name)


class FantasyPortraitSavePerformance:
    """Expression -> one .safetensors file per character in the output folder (passes the expression on)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "expression": ("FP_EXPRESSION", {"tooltip": "From Encode Expression (or Load Performance, to save a trimmed "
                                                        "or retimed copy)."}),
            "filename_prefix": ("STRING", {"default": f"{PERFORMANCE_SUBFOLDER}/performance", "tooltip":
                                           "File name in ComfyUI's output folder; a counter and .safetensors are "
                                           "added (name_00001_.safetensors), characters after the first end in _1, "
                                           "_2... Files in "
                                           f"output/{PERFORMANCE_SUBFOLDER} appear in Load Performance."}),
        }}

    RETURN_TYPES = ("FP_EXPRESSION", "STRING")
    RETURN_NAMES = ("expression", "info")
    OUTPUT_TOOLTIPS = ("The same expression, passed on.", "The files written.")
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Saves each character's encoded performance (head pose, eyes, emotion and mouth features per "
                   "frame, frame rate, source video and person, frames without a face) as .safetensors, to reuse or "
                   "share without the video. Directions (Direct Expression) are not saved: they depend on the portrait.")

    def save(self, expression, filename_prefix=f"{PERFORMANCE_SUBFOLDER}/performance"):
        drivers = list(expression or [])
        if not drivers:
            raise InputError("expression holds no character; connect Encode Expression")
        prefix = (filename_prefix or "").strip()
        if not prefix:
            raise InputError(f"filename_prefix is empty; give a name such as {PERFORMANCE_SUBFOLDER}/performance")
        out_dir = _output_dir()
        if host.folder_paths is not None:
            folder, name, counter, _, _ = host.folder_paths.get_save_image_path(prefix, out_dir)
        else:
            folder, name = os.path.split(os.path.join(out_dir, prefix))
            counter = 1 + len(glob.glob(os.path.join(glob.escape(folder), glob.escape(name) + "_*_" + EXTENSION)))
        paths = []
        for i, d in enumerate(drivers):
            # ComfyUI's counter convention (name_00001_.ext): the next save finds it and counts on
            path = os.path.join(folder, f"{name}_{counter:05d}_" + (f"{i}" if i else "") + EXTENSION)
            paths.append(save_performance(path, d))
        info = [f"{d.label}: {d.num_frames} frames at {d.fps or OUTPUT_FPS:g} fps -> {os.path.relpath(p, out_dir)}"
                + (" (as encoded: its Direct Expression settings are not saved)" if isinstance(d, DirectedExpression)
                   else "") for d, p in zip(drivers, paths)]
        log.info("[FantasyPortrait] saved performance(s): %s", "; ".join(info))
        return (drivers, "\n".join(info))


class FantasyPortraitLoadPerformance:
    """A saved .safetensors performance -> expression (one character), trimmed, retimed and looped."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "performance": (performance_files(), {"tooltip":
                            f"A saved performance: .safetensors in ComfyUI's input folder (or its "
                            f"{PERFORMANCE_SUBFOLDER} subfolder), or one Save Performance wrote ([output]). Refresh "
                            f"after adding files."}),
            "fps": ("FLOAT", {"default": OUTPUT_FPS, "min": 1.0, "max": 120.0, "step": 1.0, "tooltip":
                              "Output frame rate: the performance is resampled to it (nearest frame in time), as "
                              "driving videos are. The reference uses 25."}),
            "speed": ("FLOAT", {"default": 1.0, "min": 0.05, "max": 16.0, "step": 0.05, "tooltip":
                                "Play the performance this many times as fast (2 = twice as fast, half the frames)."}),
            "start_frame": ("INT", {"default": 0, "min": 0, "max": 1000000, "tooltip":
                                    "First saved frame to use (trim; frames as saved)."}),
            "end_frame": ("INT", {"default": 0, "min": 0, "max": 1000000, "tooltip":
                                  "Frame after the last one to use (trim; frames as saved); 0 = to the end."}),
            "frames": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip":
                               "Output frames wanted (after trim and speed): shorter ones are cut, longer ones need a "
                               "loop. 0 = all."}),
            "loop": (list(LOOP_MODES), {"default": "none", "tooltip":
                                       "To reach 'frames': repeat (0,1,2,0,1,2...) or pingpong (0,1,2,1,0,1...). "
                                       "none: asking more frames than there are is an error."}),
        }}

    RETURN_TYPES = ("FP_EXPRESSION", "STRING")
    RETURN_NAMES = ("expression", "info")
    OUTPUT_TOOLTIPS = ("One character's expression, as Encode Expression gives it: connect to Conditioning or "
                       "Direct Expression.", "Where it came from, frames and rate, frames without a face.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a performance saved by Save Performance or the CLI's --save-expression in place of a "
                   "driving video: no video, face detector or expression encoder needed.")

    def load(self, performance, fps=OUTPUT_FPS, speed=1.0, start_frame=0, end_frame=0, frames=0, loop="none"):
        if not performance:
            raise InputError(f"performance: no file chosen; put a saved performance (.safetensors) in ComfyUI's "
                             f"input folder or save one with Save Performance, then refresh")
        perf = load_performance(performance_path(performance), "performance")
        saved = perf.num_frames
        out = retime(perf, float(fps), float(speed), int(start_frame), int(end_frame) or None, int(frames) or None,
                     loop, f"performance '{performance}'")
        miss = out.track.missing
        info = (f"{perf.label} (saved {saved} frames at {perf.fps or OUTPUT_FPS:g} fps): {out.num_frames} frames at "
                f"{out.fps:g} fps (trim {start_frame}..{end_frame or saved}, speed {speed:g}, loop {loop}), "
                f"{len(miss)} without a face")
        return ([out], info)


NODES = {
    "FantasyPortraitDirectExpression": (FantasyPortraitDirectExpression, "FantasyPortrait Direct Expression"),
    "FantasyPortraitSavePerformance": (FantasyPortraitSavePerformance, "FantasyPortrait Save Performance"),
    "FantasyPortraitLoadPerformance": (FantasyPortraitLoadPerformance, "FantasyPortrait Load Performance"),
}

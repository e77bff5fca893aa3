"""Saved performances: one character's encoded expression sequence in a ``.safetensors`` file.

A performance is what :func:`~.drive.encode.encode_driving` gives for one person of a driving video:
the four PD-FGC channels per frame (:data:`~.direction.CHANNELS`), the face track (boxes and
landmarks per frame, which frames had no face) and where it came from (video, person, frame
rate). Saved, it is reused and shared without the video, the face detector or the expression
encoder: :func:`load_performance` gives back a :class:`~.drive.encode.DrivingExpression` that the rest of
the pipeline takes in place of an encoded driving video, bit for bit the same features.

File layout (safetensors, all tensors float32 unless noted; ``F`` frames):

* ``head_pose [F, 6]``, ``eyes [F, 6]``, ``emotion [F, 30]``, ``mouth [F, 512]``: the channels;
* ``boxes [F, 4]`` (x1, y1, x2, y2 pixels of the driving video), ``landmarks [F, 5, 2]``, ``detected
  [F]`` uint8 (0 = no face there; the values were filled from neighbouring frames);
* metadata (strings): ``format`` = ``fantasyportrait.performance``, ``format_version``, ``fps``,
  ``frames``, ``source`` (the driving video's file name), ``person`` (which person of it, reading
  order from 0), ``people_seen``, ``frames_without_face`` (JSON list), ``channels`` (JSON name → width).

:func:`retime` trims, retimes (speed factor; resampled to the output rate as driving videos are,
nearest frame in time, :func:`~.video.resample_indices`) and loops a performance.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from fantasyportrait_core.model.adapter import FEATURE_SPLIT
from fantasyportrait_core.drive.direction import CHANNEL_SLICES, CHANNELS
from fantasyportrait_core.validate import InputError, check_input_file
from fantasyportrait_core.media.video import atomic_write

FORMAT = "fantasyportrait.performance"
FORMAT_VERSION = "1"
EXTENSION = ".safetensors"
LOOP_MODES = ("none", "repeat", "pingpong")


def save_performance(path: str, driver) -> str:
    """Write one character's sequence to ``path`` (a ``.safetensors`` file; the folder is created).

    Args:
        driver: :class:`~.drive.encode.DrivingExpression` (``features [F, 554]``, ``track``, ``fps``,
            ``source``, ``track_index``, ``people_seen``).
    Returns:
        The absolute path written (via a temporary file: never a half-written performance).
    Raises:
        InputError: ``path`` does not end in ``.safetensors`` or cannot be written.
    """
    from safetensors.torch import save_file

    if not str(path).lower().endswith(EXTENSION):
        raise InputError(f"performance file '{path}' must end in {EXTENSION}; rename it, e.g. "
                         f"{os.path.splitext(str(path))[0]}{EXTENSION}")
    feats = driver.features.detach().float().cpu().contiguous()
    tensors = {ch: feats[:, CHANNEL_SLICES[ch]].contiguous() for ch in CHANNELS}
    track = driver.track
    tensors["boxes"] = torch.as_tensor(np.asarray(track.boxes, dtype=np.float32))
    tensors["landmarks"] = torch.as_tensor(np.asarray(track.landmarks, dtype=np.float32))
    tensors["detected"] = torch.as_tensor(np.asarray(track.detected, dtype=np.uint8))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "frames": str(feats.shape[0]),
            "fps": repr(float(driver.fps)) if driver.fps is not None else "",
            "source": os.path.basename(str(driver.source)), "person": str(int(driver.track_index)),
            "people_seen": str(int(driver.people_seen)), "frames_without_face": json.dumps(track.missing),
            "channels": json.dumps(dict(zip(CHANNELS, FEATURE_SPLIT)))}
    path = os.path.abspath(path)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_write(path, EXTENSION) as tmp:
            save_file(tensors, tmp, metadata=meta)
    except OSError as e:
        raise InputError(f"cannot write the performance '{path}' ({e.strerror or e}); choose a writable folder") from None
    return path


def performance_paths(path: str, count: int) -> list[str]:
    """File names for ``count`` characters: ``path`` for the first, then ``_1``, ``_2``… before the suffix
    (``take.safetensors``, ``take_1.safetensors``, ...)."""
    stem, ext = os.path.splitext(path)
    return [path if i == 0 else f"{stem}_{i}{ext}" for i in range(count)]


def load_performance(path: str, name: str = "performance"):
    """Read a file written by :func:`save_performance`.

    Returns:
        :class:`~.drive.encode.DrivingExpression` with float32 ``features [F, 554]``, the saved track
        (``track.missing`` = the frames without a face), ``fps``, ``source`` (the original video's
        name), ``track_index`` and ``people_seen``; ``crops`` is ``None`` (not stored).
    Raises:
        InputError: naming ``name`` and the path, for a missing file, a file that is not a saved
            performance (not safetensors, another format, channels of the wrong width, frame counts
            that disagree, values that are not finite).
    """
    from safetensors import SafetensorError, safe_open

    from fantasyportrait_core.faces.face import FaceTrack
    from fantasyportrait_core.drive.encode import DrivingExpression

    check_input_file(path, name, f"saved performance ({EXTENSION})")
    bad = f"{name} '{path}' is not a saved FantasyPortrait performance"
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            if meta.get("format") != FORMAT:
                raise InputError(f"{bad} (no '{FORMAT}' metadata); save one with Save Performance or --save-expression")
            if meta.get("format_version") != FORMAT_VERSION:
                raise InputError(f"{name} '{path}' is performance format version {meta.get('format_version')!r}; this "
                                 f"version reads {FORMAT_VERSION}: update the node pack")
            need = set(CHANNELS) | {"boxes", "landmarks", "detected"}
            if not need <= keys:
                raise InputError(f"{bad} (missing {sorted(need - keys)}); save it again")
            t = {k: f.get_tensor(k) for k in need}
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{bad} (unreadable as safetensors: {str(e).splitlines()[0][:80]}); give a file saved "
                         f"with Save Performance or --save-expression") from None
    n = t["head_pose"].shape[0]
    for ch, width in zip(CHANNELS, FEATURE_SPLIT):
        if tuple(t[ch].shape) != (n, width):
            raise InputError(f"{bad}: channel {ch} is {tuple(t[ch].shape)}, expected ({n}, {width}); save it again")
    if tuple(t["boxes"].shape) != (n, 4) or tuple(t["landmarks"].shape) != (n, 5, 2) or tuple(t["detected"].shape) != (n,):
        raise InputError(f"{bad}: its face track does not have {n} frames; save it again")
    if n < 1:
        raise InputError(f"{name} '{path}' holds no frame; save a performance with at least one frame")
    features = torch.cat([t[ch].float() for ch in CHANNELS], dim=1)
    if not torch.isfinite(features).all():
        raise InputError(f"{name} '{path}' holds NaN or infinite features; save it again from the driving video")
    try:
        fps = float(meta["fps"]) if meta.get("fps") else None
        person, people = int(meta.get("person", 0)), int(meta.get("people_seen", 1))
    except ValueError:
        raise InputError(f"{bad}: its metadata (fps, person) is unreadable; save it again") from None
    track = FaceTrack(t["boxes"].double().numpy(), t["landmarks"].double().numpy(), t["detected"].numpy().astype(bool))
    return DrivingExpression(features, track, None, meta.get("source") or os.path.basename(path), person, fps, people)


def retime_indices(num_frames: int, fps: float, out_fps: float, speed: float = 1.0, start: int = 0,
                   end: int | None = None, frames: int | None = None, loop: str = "none",
                   name: str = "performance") -> np.ndarray:
    """Frame indices of a trimmed, retimed and looped performance.

    Order: trim to the saved frames ``[start, end)``; retime — the trimmed frames, played ``speed``
    times as fast, are resampled to ``out_fps`` (nearest frame in time, as driving videos are:
    :func:`~.video.resample_indices` with a source rate of ``fps · speed``); loop to ``frames``:
    ``repeat`` (0,1,…,n−1,0,1,…) or ``pingpong`` (0,1,…,n−1,n−2,…,1,0,1,…), or cut to ``frames``.

    Args:
        num_frames: saved frames; fps: their rate; out_fps: the output rate.
        frames: output frames wanted (``None``: all the retimed frames, no loop).
    Returns:
        int64 ``[frames or retimed count]`` indices into the saved frames.
    Raises:
        InputError: a trim outside the performance, a speed not in (0, 16], an unknown loop mode, or
            more ``frames`` than the performance has without a loop.
    """
    from fantasyportrait_core.media.video import resample_indices

    if loop not in LOOP_MODES:
        raise InputError(f"loop '{loop}' is unknown; use one of {', '.join(LOOP_MODES)}")
    if not (0 < speed <= 16):
        raise InputError(f"speed {speed:g} must be above 0 and at most 16 (1 = as recorded, 2 = twice as fast)")
    end = num_frames if end is None or end == 0 else end
    if start < 0 or start >= num_frames:
        raise InputError(f"{name}: start frame {start} is outside its {num_frames} frames; use 0 to {num_frames - 1}")
    if end > num_frames or end <= start:
        raise InputError(f"{name}: end frame {end} must be after start {start} and at most its {num_frames} frames; "
                         f"the performance is shorter than asked: lower end (0 = to the end)")
    idx = start + resample_indices(end - start, fps * speed, out_fps)
    if frames is None or frames == 0:
        return idx
    if frames < 0:
        raise InputError(f"{name}: frames {frames} must be 0 (all) or more")
    n = len(idx)
    if frames > n:
        if loop == "none":
            raise InputError(f"{name} has {n} frames (after trim and speed) but {frames} were asked; set loop to "
                             f"repeat or pingpong, lower the speed, or ask for at most {n}")
        if loop == "repeat" or n == 1:
            pos = np.arange(frames) % n
        else:
            period = 2 * n - 2
            pos = np.arange(frames) % period
            pos = np.where(pos < n, pos, period - pos)
        return idx[pos]
    return idx[:frames]


def retime(driver, out_fps: float | None = None, speed: float = 1.0, start: int = 0, end: int | None = None,
           frames: int | None = None, loop: str = "none", name: str = "performance"):
    """A trimmed, retimed, looped copy of a :class:`~.drive.encode.DrivingExpression` (features and
    track taken at :func:`retime_indices`; ``fps`` becomes ``out_fps``). The same object when nothing
    changes."""
    import dataclasses

    from fantasyportrait_core.faces.face import FaceTrack
    from fantasyportrait_core.media.video import OUTPUT_FPS

    fps = float(driver.fps) if driver.fps else float(OUTPUT_FPS)
    out_fps = fps if out_fps is None else float(out_fps)
    if not out_fps > 0:
        raise InputError(f"fps {out_fps} must be above 0")
    idx = retime_indices(driver.num_frames, fps, out_fps, speed, start, end, frames, loop, name)
    if np.array_equal(idx, np.arange(driver.num_frames)) and abs(out_fps - fps) < 1e-9:
        return driver
    t = driver.track
    track = FaceTrack(np.asarray(t.boxes)[idx], np.asarray(t.landmarks)[idx], np.asarray(t.detected)[idx],
                      [t.embeddings[i] for i in idx] if len(t.embeddings) == driver.num_frames else list(t.embeddings))
    crops = driver.crops[idx] if driver.crops is not None else None
    return dataclasses.replace(driver, features=driver.features[torch.as_tensor(idx)], track=track, crops=crops,
                               fps=out_fps)


__all__ = ["EXTENSION", "FORMAT", "LOOP_MODES", "load_performance", "performance_paths", "retime", "retime_indices",
           "save_performance"]

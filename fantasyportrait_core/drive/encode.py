"""A driving video's expressions: the most present people's face tracks, aligned crops and PD-FGC
expression features per frame (:func:`encode_driving`), and how many frames the drivers cover
(:func:`frames_for`)."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from fantasyportrait_core.drive.filters import one_euro_landmarks, smooth_over_time
from fantasyportrait_core.faces.face import FaceTrack, detect_video, order_tracks, rank_tracks, track_faces
from fantasyportrait_core.model.expression import CROP_SIZE, align_face, encode_expressions
from fantasyportrait_core.model.geometry import floor_to_4k1

log = logging.getLogger("FantasyPortrait")


@dataclass
class DrivingExpression:
    """One character's expression sequence from a driving video.

    Attributes:
        features: float32 ``[F, 554]`` (headpose, eye, emotion, mouth) per frame.
        track: the face track the crops were aligned from (``track.missing``: filled frames).
        crops: uint8 ``[F, 224, 224, 3]`` aligned crops (for previews).
        source: the driving video as the user knows it (file name where known), for labels and messages.
        track_index: which person of that video (0-based, reading order of the tracked ones).
        fps: frame rate of ``features`` (the output rate the driver was resampled to), or ``None``.
        people_seen: people found through that video (face tracks in at least
            :data:`PRESENT_FRACTION` of the frames), so callers can say how many were left unused.
    """

    features: torch.Tensor
    track: FaceTrack
    crops: np.ndarray = field(repr=False, default=None)
    source: str = "driving video"
    track_index: int = 0
    fps: float | None = None
    people_seen: int = 1

    @property
    def num_frames(self) -> int:
        return self.features.shape[0]

    @property
    def label(self) -> str:
        """Which track of which video, e.g. ``"drive3.mp4 #2"``."""
        return f"{os.path.basename(self.source)} #{self.track_index}"


LANDMARK_FILTERS = ("one_euro", "none")
PRESENT_FRACTION = 0.2  # a face track counts as a person of the video when detected in >= 20 % of frames


@contextlib.contextmanager
def _no_progress(desc: str, total: int | None):
    yield lambda n: None


def encode_driving(detector, encoder, frames, people: int = 1, smooth: float = 0.0,
                   landmark_filter: str = "one_euro", source: str = "driving video", fps: float | None = None,
                   progress=None) -> list[DrivingExpression]:
    """Expression features of the ``people`` most present faces of a driving video.

    Every frame gets features: where a face is missing its landmarks are interpolated from the
    nearest frames with a face (listed in ``track.missing``), so the length always equals the
    frame count.

    Streaming: ``frames`` is iterated twice (detection, then alignment), one detection batch at a
    time; besides that batch only the per-frame face boxes and one 224×224 crop per frame and
    person are kept, so with a :class:`~fantasyportrait_core.media.video.VideoStream` memory is
    ``16 frames + F · people · 147 KiB`` whatever the clip's length.

    Args:
        detector: face detector (``detect(image) -> list[Face]``, optionally ``detect_batch``).
        encoder: :class:`~fantasyportrait_core.model.expression.FanEncoder`.
        frames: uint8 ``[F, H, W, 3]`` RGB, or a re-iterable of ``[H, W, 3]`` frames that yields the
            same frames each time (a ``VideoStream``), already at the output frame rate (the
            reference resamples every driver to 25 fps first; :func:`~fantasyportrait_core.media.video.resample_indices`).
        people: characters to take from this video (the most present ones, in reading order).
        smooth: extra Gaussian smoothing of the landmarks, sigma in frames (0 = none, as the
            reference); applied after ``landmark_filter``.
        landmark_filter: ``"one_euro"`` (default, the reference's tracker filter:
            :func:`one_euro_landmarks`) or ``"none"`` (raw detector landmarks).
        source: the driving video as the user knows it, for labels (``"drive3.mp4"`` ->
            ``"drive3.mp4 #1"``) and messages.
        fps: the frame rate of ``frames`` (kept for reports; nothing is resampled here).
        progress: optional ``progress(description, total)`` context manager yielding
            ``update(n)`` (a tqdm or ComfyUI progress bar).
    Returns:
        ``people`` :class:`DrivingExpression`, in reading order.
    Raises:
        InputError: no frame, no face in any frame, or fewer people than ``people`` (names the
            video and both counts); an unknown ``landmark_filter``.
    """
    from fantasyportrait_core.validate import InputError

    if landmark_filter not in LANDMARK_FILTERS:
        raise InputError(f"landmark filter {landmark_filter!r}: choose one of {LANDMARK_FILTERS}")
    name = source
    progress = progress or _no_progress
    total = len(frames) if hasattr(frames, "__len__") else getattr(frames, "estimated_frames", lambda: None)()
    with progress(f"faces in {os.path.basename(name)}", total) as update:
        per_frame = detect_video(detector, frames, progress=update)
    if not per_frame:
        raise InputError(f"{name}: the driving video has no frames")
    try:
        all_tracks = track_faces(per_frame)
    except ValueError:
        raise InputError(f"{name}: no face was found in any of its {len(per_frame)} frame(s); use a video showing "
                         f"the face clearly (or remove it)") from None
    seen = [t for t in all_tracks if t.detected.mean() >= PRESENT_FRACTION]
    if len(all_tracks) < people:
        raise InputError(f"{name} shows {len(all_tracks)} face(s) but {people} character(s) were asked of it; set "
                         f"people to {len(all_tracks)} or use another video")
    tracks = order_tracks(rank_tracks(all_tracks)[:people])
    if len(seen) > people:
        log.warning("[FantasyPortrait] %s shows %d people; animating the %d most present (people = %d). Set people to "
                    "%d to animate them all.", name, len(seen), people, people, len(seen))
    landmarks = []
    for t in tracks:
        lm = t.landmarks
        if landmark_filter == "one_euro":
            lm = one_euro_landmarks(lm, t.boxes[:, 2] - t.boxes[:, 0])
        if smooth > 0:
            lm = smooth_over_time(lm, smooth)
        landmarks.append(lm)
    crops = [np.empty((len(per_frame), CROP_SIZE, CROP_SIZE, 3), np.uint8) for _ in tracks]
    with progress(f"expressions in {os.path.basename(name)}", len(per_frame) * len(tracks)) as update:
        i = 0
        for i, frame in enumerate(frames):
            if i >= len(per_frame):
                break
            for k, lm in enumerate(landmarks):
                crops[k][i] = align_face(frame, lm[i])
        if i + 1 != len(per_frame):
            raise InputError(f"{name}: the video gave {len(per_frame)} frames, then {i + 1}; it must be readable twice")
        out = []
        for k, (track, c) in enumerate(zip(tracks, crops)):
            feats = []
            for start in range(0, len(c), ENCODE_BATCH):
                feats.append(encode_expressions(encoder, c[start:start + ENCODE_BATCH]))
                update(len(feats[-1]))
            out.append(DrivingExpression(torch.cat(feats), track, c, source, k, fps, max(len(seen), people)))
            if track.missing:
                log.warning("[FantasyPortrait] %s #%d: no face in %d frame(s) %s; filled from neighbouring frames",
                            name, k, len(track.missing), _short(track.missing))
    return out


ENCODE_BATCH = 32


def _short(idx: list[int], n: int = 12) -> str:
    return str(idx[:n])[:-1] + (", ...]" if len(idx) > n else "]")


def frames_for(drivers: list[DrivingExpression], max_frames: int | None = None) -> int:
    """Frames to generate: the shortest driver, capped, floored to 4k+1 (reference ``find_replacement``)."""
    n = min(d.num_frames for d in drivers)
    if max_frames is not None:
        n = min(n, max_frames)
    n = floor_to_4k1(n)
    if n < 1:
        from fantasyportrait_core.validate import InputError

        raise InputError("no frame to generate: the driving video has no frames or frames was below 1")
    return n

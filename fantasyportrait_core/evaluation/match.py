"""Generated faces paired with their drivers: frames resampled to one rate
(:func:`resample_frames`) and each character's generated face track picked by the assignment the
generation used (:func:`match_generated_faces`)."""

from __future__ import annotations

import numpy as np

from fantasyportrait_core.faces.assign import assign_faces
from fantasyportrait_core.faces.face import Face, FaceTrack
from fantasyportrait_core.media.video import Video, resample_fps

_MIN_TRACK_COVERAGE = 0.5  # generated-face tracks seen in fewer frames are detector noise


def resample_frames(frames: np.ndarray, fps: float, to_fps: float) -> np.ndarray:
    """``frames`` at ``fps`` resampled (nearest frame) to ``to_fps`` (:func:`~.video.resample_fps`)."""
    if not fps or not to_fps or fps <= 0 or to_fps <= 0:
        raise ValueError(f"frame rates must be positive, got {fps} and {to_fps}")
    return resample_fps(Video(np.asarray(frames), float(fps)), float(to_fps)).frames


def _track_face(track: FaceTrack) -> Face:
    """A :class:`Face` standing for ``track`` in the generated video's first frame (for
    :func:`~.faces.assign.assign_faces`, which sees the generation's reference the same way)."""
    emb = np.mean(track.embeddings, axis=0) if track.embeddings else None
    return Face(box=track.boxes[0].copy(), landmarks=track.landmarks[0].copy(), score=1.0, embedding=emb)


def match_generated_faces(tracks: list[FaceTrack], count: int, order: list[int] | None = None,
                          mode: str = "left_to_right", driver_embeddings: list | None = None) -> list[FaceTrack]:
    """The generated-face track of each of ``count`` characters, by the generation's own rule.

    Generation gives character ``i`` the reference face :func:`~.faces.assign.assign_faces` picks; the
    generated video's first frame is that reference, so the same call on the generated faces (left
    to right, at frame 0) with the same ``order`` / ``mode`` picks the same faces. Tracks seen in
    fewer than half the frames are dropped first (detector noise).

    Raises:
        ValueError: fewer generated faces than characters (from ``assign_faces``, names both counts).
    """
    n = len(tracks[0]) if tracks else 0
    solid = [t for t in tracks if t.detected.sum() >= _MIN_TRACK_COVERAGE * n] or list(tracks)
    pairs = sorted(((_track_face(t), t) for t in solid), key=lambda p: p[0].center[0])
    faces = [f for f, _ in pairs]
    by_face = {id(f): t for f, t in pairs}
    chosen = assign_faces(faces, count, order, mode, driver_embeddings)
    return [by_face[id(f)] for f in chosen]

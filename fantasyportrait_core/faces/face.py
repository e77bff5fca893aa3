"""Faces: the :class:`Face` record, box geometry, and per-person face tracks for driving videos.

Detector backends live in :mod:`fantasyportrait_core.faces.detect`. Faces are numbered in reading order
(:func:`reading_order`: rows top to bottom, left to right inside a row), the numbers the face
preview shows and ``face_order`` takes; a driving video yields one :class:`FaceTrack` per person in
the same order, always one entry per frame: frames where that person's face was not found are
filled from the nearest detected frames and listed in ``FaceTrack.missing``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("FantasyPortrait")

@dataclass(eq=False)  # faces compare by identity (arrays inside)
class Face:
    """One detected face.

    Attributes:
        box: float ``[4]`` pixel ``x1, y1, x2, y2``.
        landmarks: float ``[5, 2]`` pixel (x, y): left eye, right eye, nose tip, left mouth corner,
            right mouth corner (left/right in image terms).
        score: detector confidence in [0, 1].
        embedding: optional identity embedding (backends that provide one).
        pose: optional float ``[3]`` head pose in degrees: pitch, yaw (from the official landmark
            model's euler output) and roll (the eye-corner line in the image); ``official`` only.
    """

    box: np.ndarray
    landmarks: np.ndarray
    score: float
    embedding: np.ndarray | None = None
    pose: np.ndarray | None = None

    @property
    def center(self) -> np.ndarray:
        return np.array([(self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2])

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0))


def order_points(landmarks: np.ndarray) -> np.ndarray:
    """Put (eye, eye, nose, mouth, mouth) in image order: left eye/mouth corner first (smaller x)."""
    lm = np.asarray(landmarks, dtype=np.float64).copy()
    if lm[0, 0] > lm[1, 0]:
        lm[[0, 1]] = lm[[1, 0]]
    if lm[3, 0] > lm[4, 0]:
        lm[[3, 4]] = lm[[4, 3]]
    return lm


def check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB, got {image.dtype}")
    return np.ascontiguousarray(image)


ROW_TOLERANCE = 0.5  # a face is in a row when its centre is within half a face height of the row's top face


def reading_order(boxes: np.ndarray, tolerance: float = ROW_TOLERANCE) -> list[int]:
    """Indices of ``boxes [N, 4]`` (x1, y1, x2, y2) in reading order: rows top to bottom, left to
    right inside a row.

    Faces are taken by centre height; a face joins the current row when its centre lies within
    ``tolerance`` × the larger of its height and the height of the row's first (highest) face below
    that face's centre, else it starts a new row. So faces side by side at slightly different
    heights keep left-to-right order, a 2×2 group numbers TL, TR, BL, BR, and faces stacked in a
    column number top to bottom whatever their x (a few pixels never decide).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return []
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    hgt = np.maximum(boxes[:, 3] - boxes[:, 1], 1e-6)
    rows: list[list[int]] = []
    for i in np.argsort(cy, kind="stable"):
        if rows:
            top = rows[-1][0]
            if cy[i] - cy[top] <= tolerance * max(hgt[i], hgt[top]):
                rows[-1].append(int(i))
                continue
        rows.append([int(i)])
    return [i for row in rows for i in sorted(row, key=lambda k: (cx[k], cy[k]))]


def in_reading_order(faces: list["Face"], tolerance: float = ROW_TOLERANCE) -> list["Face"]:
    """``faces`` sorted by :func:`reading_order` of their boxes."""
    if not faces:
        return []
    return [faces[i] for i in reading_order(np.stack([f.box for f in faces]), tolerance)]


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = 0.4, contain: float = 0.7) -> list[int]:
    """Indices of boxes kept by greedy non-maximum suppression, best score first.

    A box is also dropped when most of it (``contain`` of the smaller box's area) lies inside a
    better box: detectors sometimes add a loose second box around a face, whose IoU with the tight
    one is low.
    """
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    order = list(np.argsort(-np.asarray(scores)))
    keep = []
    while order:
        i = order.pop(0)
        keep.append(int(i))
        if order:
            overlaps = box_iou(boxes[i:i + 1], boxes[order])[0]
            inside = box_containment(boxes[i:i + 1], boxes[order])[0]
            order = [j for j, o, c in zip(order, overlaps, inside) if o <= iou and c <= contain]
    return keep


def box_containment(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over the smaller box's area, ``[N, M]``."""
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    inter = _intersection(a, b)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(np.minimum(area_a[:, None], area_b[None, :]), 1e-9)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    return np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between boxes ``a [N, 4]`` and ``b [M, 4]`` -> ``[N, M]``."""
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    inter = _intersection(a, b)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


@dataclass
class FaceTrack:
    """One person's face through a driving video, one entry per frame.

    Attributes:
        boxes: float ``[F, 4]``; landmarks: float ``[F, 5, 2]``.
        detected: bool ``[F]``, False where values were filled from neighbouring frames.
    """

    boxes: np.ndarray
    landmarks: np.ndarray
    detected: np.ndarray
    embeddings: list = field(default_factory=list)

    @property
    def missing(self) -> list[int]:
        """Frame indices filled from neighbours."""
        return np.flatnonzero(~self.detected).tolist()

    def __len__(self) -> int:
        return len(self.detected)


def fill_missing(values: np.ndarray, detected: np.ndarray) -> np.ndarray:
    """Linear interpolation over frames of ``values [F, ...]`` where ``detected`` is False; ends
    hold the nearest detected value.

    Raises:
        ValueError: if no frame is detected.
    """
    detected = np.asarray(detected, bool)
    if not detected.any():
        raise ValueError("no frame has a face to fill the others from")
    values = np.asarray(values, dtype=np.float64)
    flat = values.reshape(len(values), -1)
    frames = np.arange(len(values))
    known = np.flatnonzero(detected)
    out = np.stack([np.interp(frames, known, flat[known, j]) for j in range(flat.shape[1])], axis=1)
    return out.reshape(values.shape)


def box_affinity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How likely boxes ``a [N, 4]`` and ``b [M, 4]`` are the same face in nearby frames, in [0, 1]:
    the larger of IoU and centre closeness (1 at the same centre, 0 at one box size apart), so a
    fast head move with little overlap still links."""
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    ca, cb = (a[:, :2] + a[:, 2:]) / 2, (b[:, :2] + b[:, 2:]) / 2
    size = np.maximum((a[:, 2:] - a[:, :2]).max(1)[:, None], (b[:, 2:] - b[:, :2]).max(1)[None, :])
    dist = np.linalg.norm(ca[:, None] - cb[None], axis=-1) / np.maximum(size, 1e-9)
    return np.maximum(box_iou(a, b), np.clip(1 - dist, 0, 1))


def _cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))


def _mean_embedding(frames: dict) -> np.ndarray | None:
    embs = [f.embedding for f in frames.values() if f.embedding is not None]
    return np.mean(embs, axis=0) if embs else None


def track_faces(per_frame: list[list[Face]], max_people: int | None = None, min_affinity: float = 0.3,
                min_identity: float = 0.3) -> list[FaceTrack]:
    """Link per-frame detections into person tracks.

    1. Frame to frame: greedy matching, best pairs first, on :func:`box_affinity` (a track keeps
       its last box while unseen, so a face that vanishes for a few frames and comes back nearby
       keeps its track); with identity embeddings a pair must also look alike.
    2. Stitching: a track that starts after another ended, near where it ended (within 1.5 box
       sizes; same identity when embeddings exist), continues it.
    Tracks are ranked by frames covered, then by mean size (:func:`rank_tracks`); the
    ``max_people`` best are kept and returned in reading order of their mean boxes
    (:func:`order_tracks`), each with one entry per frame.

    Args:
        per_frame: for each frame, the faces found (any order).
        max_people: tracks to keep; ``None`` keeps every track.
    Returns:
        Tracks with one entry per frame, gaps filled (see :func:`fill_missing`).
    Raises:
        ValueError: if no frame has a face (names the frame count).
    """
    n = len(per_frame)
    if n == 0:
        raise ValueError("the driving video has no frames")
    tracks: list[dict] = []  # {'last': box, 'frames': {i: Face}}
    for i, faces in enumerate(per_frame):
        if not faces:
            continue
        boxes = np.stack([f.box for f in faces])
        taken_t, taken_f = set(), set()
        if tracks:
            aff = box_affinity(np.stack([t["last"] for t in tracks]), boxes)
            for ti, fi in sorted(np.ndindex(aff.shape), key=lambda p: -aff[p]):
                if aff[ti, fi] < min_affinity:
                    break
                if ti in taken_t or fi in taken_f:
                    continue
                ref = tracks[ti]["last_emb"]
                if ref is not None and faces[fi].embedding is not None and _cosine(ref, faces[fi].embedding) < min_identity:
                    continue
                taken_t.add(ti)
                taken_f.add(fi)
                tracks[ti]["frames"][i] = faces[fi]
                tracks[ti]["last"] = faces[fi].box
                tracks[ti]["last_emb"] = faces[fi].embedding if faces[fi].embedding is not None else ref
        for fi, face in enumerate(faces):
            if fi not in taken_f:
                tracks.append({"last": face.box, "last_emb": face.embedding, "frames": {i: face}})
    if not tracks:
        raise ValueError(f"no face was found in any of the {n} driving frames")
    tracks = _stitch(tracks, min_identity)

    out = []
    for t in tracks:
        detected = np.zeros(n, bool)
        boxes = np.zeros((n, 4))
        lms = np.zeros((n, 5, 2))
        for i, f in t["frames"].items():
            detected[i], boxes[i], lms[i] = True, f.box, f.landmarks
        out.append(FaceTrack(fill_missing(boxes, detected), fill_missing(lms, detected), detected,
                             [f.embedding for f in t["frames"].values() if f.embedding is not None]))
    return order_tracks(rank_tracks(out)[: max_people or len(out)])


def _mean_area(track: "FaceTrack") -> float:
    b = track.boxes[track.detected]
    return float(np.mean((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])))


def rank_tracks(tracks: list[FaceTrack]) -> list[FaceTrack]:
    """Most present first: by frames with a detection, then by mean face area."""
    return sorted(tracks, key=lambda t: (int(t.detected.sum()), _mean_area(t)), reverse=True)


def order_tracks(tracks: list[FaceTrack]) -> list[FaceTrack]:
    """Tracks in :func:`reading_order` of their mean detected boxes (the order of characters taken
    from one driving video)."""
    if not tracks:
        return []
    means = np.stack([t.boxes[t.detected].mean(0) for t in tracks])
    return [tracks[i] for i in reading_order(means)]


def _stitch(tracks: list[dict], min_identity: float) -> list[dict]:
    """Join tracklets that follow each other in time and space (longest continuation first)."""
    tracks = sorted(tracks, key=lambda t: min(t["frames"]))
    merged = True
    while merged:
        merged = False
        best = None
        for a in tracks:
            end_a = max(a["frames"])
            box_a = a["frames"][end_a].box
            for b in tracks:
                if b is a or min(b["frames"]) <= end_a:
                    continue
                box_b = b["frames"][min(b["frames"])].box
                ca, cb = (box_a[:2] + box_a[2:]) / 2, (box_b[:2] + box_b[2:]) / 2
                size = max((box_a[2:] - box_a[:2]).max(), (box_b[2:] - box_b[:2]).max(), 1e-9)
                dist = np.linalg.norm(ca - cb) / size
                ea, eb = _mean_embedding(a["frames"]), _mean_embedding(b["frames"])
                if dist > 1.5 or (ea is not None and eb is not None and _cosine(ea, eb) < min_identity):
                    continue
                key = (dist, min(b["frames"]) - end_a)
                if best is None or key < best[0]:
                    best = (key, a, b)
        if best is not None:
            _, a, b = best
            a["frames"].update(b["frames"])
            a["last"], a["last_emb"] = b["last"], b["last_emb"]
            tracks.remove(b)
            merged = True
    return tracks


DETECT_BATCH_PIXELS = 16 * 512 * 512  # frames per detection batch: 16 at 512², 4 at 720p, 2 at 1080p


def detect_video(detector, frames, batch_size: int | None = None, progress=None) -> list[list[Face]]:
    """Faces in every frame of ``frames``: ``detector.detect_batch`` on batches where the backend
    has it, else ``detector.detect`` per frame.

    Batches hold about :data:`DETECT_BATCH_PIXELS` pixels (``batch_size`` overrides), so the
    detector's memory (MTCNN's image pyramid and first feature maps, ~60 bytes per pixel) stays
    near 1 GiB whatever the frame size.

    Args:
        frames: ``[F, H, W, 3]`` uint8 RGB array or any re-iterable of ``[H, W, 3]`` frames (e.g. a
            :class:`~fantasyportrait_core.media.video.VideoStream`: one batch is in memory at a time).
        progress: optional ``progress(n)`` called with the frames done after each batch.
    """
    from fantasyportrait_core.media.video import iter_batches

    if batch_size is None:
        if isinstance(frames, np.ndarray) and frames.ndim == 4:
            h, w = frames.shape[1:3]
        else:
            h, w = getattr(frames, "height", 512), getattr(frames, "width", 512)
        batch_size = max(1, DETECT_BATCH_PIXELS // max(h * w, 1))
    batch = getattr(detector, "detect_batch", None)
    out: list[list[Face]] = []
    for chunk in iter_batches(frames, batch_size):
        out += batch(np.asarray(chunk)) if batch is not None else [detector.detect(f) for f in chunk]
        if progress is not None:
            progress(len(chunk))
    return out

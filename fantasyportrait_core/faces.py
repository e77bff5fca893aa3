"""Face detection (boxes + 5 landmarks) and per-person face tracks for driving videos.

The default backend needs nothing downloaded: MediaPipe 0.10.21 ships its BlazeFace detector
(full-range) and Face Mesh models inside the wheel. Boxes come from the detector; the 5 alignment
points (pupil centres, nose tip, mouth corners, as PD-FGC's ``warp_face_pd_fgc`` expects) come from
Face Mesh run on a crop around each box.

Faces in a reference image are returned left to right; a driving video yields one
:class:`FaceTrack` per person, always one entry per frame: frames where that person's face was not
found are filled from the nearest detected frames and listed in ``FaceTrack.missing``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("FantasyPortrait")

# Face Mesh (478 points with iris refinement) indices: pupil centres (the reference's 222-point
# indices 182/202 are pupil centres too), nose tip, mouth corners.
_MESH_EYE_A = 468
_MESH_EYE_B = 473
_MESH_NOSE = 1
_MESH_MOUTH = (61, 291)


@dataclass
class Face:
    """One detected face.

    Attributes:
        box: float ``[4]`` pixel ``x1, y1, x2, y2``.
        landmarks: float ``[5, 2]`` pixel (x, y): left eye, right eye, nose tip, left mouth corner,
            right mouth corner (left/right in image terms).
        score: detector confidence in [0, 1].
        embedding: optional identity embedding (backends that provide one).
    """

    box: np.ndarray
    landmarks: np.ndarray
    score: float
    embedding: np.ndarray | None = None

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


class MediaPipeDetector:
    """Offline face detector: MediaPipe BlazeFace + Face Mesh (models inside the wheel).

    Both BlazeFace models run and their boxes are merged (NMS): the short-range model finds
    close-up faces (talking-head driving videos) that the full-range one misses, and the
    full-range one finds small faces in group shots.

    Args:
        min_score: detection confidence threshold.
        crop_scale: side of the square crop given to Face Mesh, in face-box sizes.
    Raises:
        ImportError: naming the package to install when mediapipe is missing.
    """

    name = "mediapipe"

    def __init__(self, min_score: float = 0.5, crop_scale: float = 2.0):
        # mediapipe's C++ side logs feedback-tensor warnings for every graph; keep errors only.
        os.environ.setdefault("GLOG_minloglevel", "2")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        try:
            import mediapipe as mp
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "The offline face detector needs mediapipe 0.10.21 (its wheel ships the face models): "
                "pip install 'mediapipe==0.10.21'"
            ) from e
        self._mp = mp
        self.min_score, self.crop_scale = min_score, crop_scale
        self._dets = [mp.solutions.face_detection.FaceDetection(model_selection=sel, min_detection_confidence=min_score)
                      for sel in (0, 1)]
        self._mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1,
                                                     refine_landmarks=True, min_detection_confidence=0.3)

    def close(self):
        for d in self._dets:
            d.close()
        self._mesh.close()

    def _landmarks(self, image: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        h, w = image.shape[:2]
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        side = max(box[2] - box[0], box[3] - box[1]) * self.crop_scale
        x0, y0 = int(max(cx - side / 2, 0)), int(max(cy - side / 2, 0))
        x1, y1 = int(min(cx + side / 2, w)), int(min(cy + side / 2, h))
        if x1 - x0 < 8 or y1 - y0 < 8:
            return None
        crop = np.ascontiguousarray(image[y0:y1, x0:x1])
        res = self._mesh.process(crop)
        if not res.multi_face_landmarks:
            return None
        pts = np.array([(p.x * (x1 - x0) + x0, p.y * (y1 - y0) + y0) for p in res.multi_face_landmarks[0].landmark])
        five = np.stack([pts[_MESH_EYE_A], pts[_MESH_EYE_B], pts[_MESH_NOSE],
                         pts[_MESH_MOUTH[0]], pts[_MESH_MOUTH[1]]])
        return order_points(five)

    def _keypoint_landmarks(self, det, w: int, h: int) -> np.ndarray:
        # BlazeFace keypoints: right eye, left eye, nose tip, mouth centre, two ear tragions.
        kp = np.array([(k.x * w, k.y * h) for k in det.location_data.relative_keypoints])
        eyes = kp[:2][np.argsort(kp[:2, 0])]
        half = (eyes[1] - eyes[0]) * 0.4  # mouth corners: mouth centre +- ~0.4 inter-eye distance
        return np.stack([eyes[0], eyes[1], kp[2], kp[3] - half, kp[3] + half])

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in ``image`` (``[H, W, 3]`` uint8 RGB), left to right.

        A face whose mesh fails gets landmarks from the detector's 6 keypoints instead
        (mouth corners estimated), with a debug log line.
        """
        image = _check_image(image)
        h, w = image.shape[:2]
        found = []
        for det_model in self._dets:
            for det in det_model.process(image).detections or []:
                bb = det.location_data.relative_bounding_box
                box = np.array([bb.xmin * w, bb.ymin * h, (bb.xmin + bb.width) * w, (bb.ymin + bb.height) * h])
                box = np.clip(box, 0, [w, h, w, h])
                if box[2] - box[0] >= 2 and box[3] - box[1] >= 2:
                    found.append((box, det))
        keep = nms(np.array([b for b, _ in found]).reshape(-1, 4), np.array([d.score[0] for _, d in found]))
        faces = []
        for box, det in (found[i] for i in keep):
            lm = self._landmarks(image, box)
            if lm is None:
                log.debug("[FantasyPortrait] face mesh failed on a face box; using detector keypoints")
                lm = self._keypoint_landmarks(det, w, h)
            faces.append(Face(box=box, landmarks=lm, score=float(det.score[0])))
        return sorted(faces, key=lambda f: f.center[0])


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB, got {image.dtype}")
    return np.ascontiguousarray(image)


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
    Tracks are ranked by frames covered, then by mean size; the ``max_people`` best are kept and
    returned left to right (by mean centre x), each with one entry per frame.

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

    def rank(t):
        return (len(t["frames"]), np.mean([f.area for f in t["frames"].values()]))

    kept = sorted(tracks, key=rank, reverse=True)[: max_people or len(tracks)]
    out = []
    for t in kept:
        detected = np.zeros(n, bool)
        boxes = np.zeros((n, 4))
        lms = np.zeros((n, 5, 2))
        for i, f in t["frames"].items():
            detected[i], boxes[i], lms[i] = True, f.box, f.landmarks
        out.append(FaceTrack(fill_missing(boxes, detected), fill_missing(lms, detected), detected,
                             [f.embedding for f in t["frames"].values() if f.embedding is not None]))
    return sorted(out, key=lambda t: t.boxes[t.detected][:, [0, 2]].mean())


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


def detect_video(detector, frames: np.ndarray) -> list[list[Face]]:
    """Run ``detector.detect`` on every frame of ``frames [F, H, W, 3]`` uint8 RGB."""
    return [detector.detect(frame) for frame in frames]

"""How faithfully a generated video follows its driving video: expression-fidelity metrics.

Both videos go through the same face pipeline as generation (:func:`~.faces.detect_video`,
:func:`~.faces.track_faces`, the 5-point alignment of :mod:`.expression`), frame ``i`` of the
generated video is compared with frame ``i`` of the driving video (after resampling both to one
frame rate), and each character's generated face is matched to its driver by the assignment the
generation used (:func:`~.faces.assign.assign_faces`). Per character:

========================  =====================================================================
metric                    definition (source)
========================  =====================================================================
``expression``            AED-style: mean over frames of the L2 distance between the PD-FGC
                          emotion (30) + mouth (512) features of the generated and the driving
                          face. AED/APD are the talking-head reenactment metrics of PIRenderer
                          (Ren et al., ICCV 2021) and its successors, there on 3DMM expression /
                          pose coefficients; FantasyPortrait (arXiv 2507.12956, §4, ExprBench)
                          reports AED, APD and an eye-motion MAE. Here the 3DMM is replaced by
                          the PD-FGC encoder the model is conditioned on (:func:`feature_metrics`).
``head_pose``             APD-style: the same on the PD-FGC headpose features (6).
``eye_openness``          per-frame eye opening (:func:`crop_curves` / :func:`mesh_curves`),
                          Pearson correlation and MAE between the two curves (the paper's eye
                          MAE idea, §4) (:func:`curve_metrics`).
``mouth_opening``         the same for the mouth opening.
``mouth_width``           the same for the mouth-corner distance (from the 5 landmarks).
``identity``              mean cosine similarity of ArcFace embeddings of the generated face to
                          the reference face (insightface backend only; else "not measured").
                          PD-FGC features are identity-agnostic by design and never used here.
``overall``               see :func:`overall_score`.
========================  =====================================================================

Every distance also has a ``relative`` form (divided by the driving clip's own spread, so 1 means
"as far off as a frozen average face") and a ``score`` ``1 / (1 + relative)`` in (0, 1].

PD-FGC numbers are only meaningful with the released ``pd_fpg.pth``; with a randomly initialised
encoder (tests, ``--tiny-random``) they are structurally right (0 for identical faces, growing
with difference) but their size says nothing, and the report says so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from fantasyportrait_core.model.expression import ALIGN_TEMPLATE, CROP_SIZE, encode_expressions, umeyama
from fantasyportrait_core.faces.face import Face, FaceTrack, detect_video, fill_missing, track_faces
from fantasyportrait_core.faces.assign import ASSIGN_MODES, assign_faces
from fantasyportrait_core.media.video import Video, resample_fps

log = logging.getLogger("FantasyPortrait")

# PD-FGC feature layout (:class:`~.expression.FanEncoder` output): headpose, eye, emotion, mouth.
POSE = slice(0, 6)
EXPRESSION = slice(12, 554)  # emotion 30 + mouth 512
EMOTION = slice(12, 42)
MOUTH = slice(42, 554)

MEASURE_SIZE = 448  # aligned crop for the landmark curves: 2x the PD-FGC crop, for sub-pixel room
LANDMARK_SOURCES = ("auto", "mesh", "crop")
CURVES = ("eye_openness", "mouth_opening", "mouth_width")

# Crop fallback (:func:`crop_curves`), in inter-ocular distances (IOD) of the aligned face.
_EYE_HALF_WIDTH, _EYE_ABOVE, _EYE_BELOW = 0.12, 0.10, 0.10
_MOUTH_ABOVE, _MOUTH_BELOW, _MOUTH_HALF_WIDTH = 0.20, 0.60, 0.25  # half width in mouth widths
_DARK, _PALE_CHROMA, _PALE_LIGHT = 0.6, 0.6, 0.9  # "interior": L < 0.6 skin, or chroma < 0.6 & L > 0.9 skin
# MediaPipe Face Mesh (468/478-point topology) indices: upper / lower eyelid of each eye, inner lips.
_MESH_LIDS = ((159, 145), (386, 374))
_MESH_LIPS = (13, 14)
# Floors of the "spread" a distance is divided by: below them a driver is considered static.
_CURVE_SPREAD_FLOOR = 0.01  # 1 % of the inter-ocular distance
_FEATURE_SPREAD_FLOOR = 1e-6
_MIN_TRACK_COVERAGE = 0.5  # generated-face tracks seen in fewer frames are detector noise


# ----------------------------------------------------------------------------------------------
# Per-face measurements


def aligned_measure_crops(frames: np.ndarray, landmarks: np.ndarray, size: int = MEASURE_SIZE):
    """Faces warped to the PD-FGC 5-point template at ``size`` px, and the 5 landmarks in the crop.

    Same similarity transform as :func:`~.expression.align_face` (Umeyama onto ``ALIGN_TEMPLATE``),
    bilinear, at ``size`` instead of 224.

    Args:
        frames: uint8 ``[F, H, W, 3]`` RGB; landmarks: float ``[F, 5, 2]`` pixels.
    Returns:
        (uint8 ``[F, size, size, 3]``, float64 ``[F, 5, 2]`` landmark pixels in the crop).
    """
    crops, points = [], []
    for frame, lm in zip(frames, landmarks):
        m = umeyama(lm, ALIGN_TEMPLATE * size)
        crops.append(cv2.warpAffine(frame, m, (size, size), flags=cv2.INTER_LINEAR))
        points.append(np.asarray(lm, np.float64) @ m[:, :2].T + m[:, 2])
    return np.stack(crops), np.stack(points)


def interocular(points5: np.ndarray) -> np.ndarray:
    """Distance between the two eye landmarks of ``[..., 5, 2]`` points -> ``[...]``."""
    return np.linalg.norm(points5[..., 1, :] - points5[..., 0, :], axis=-1)


def mouth_width(points5: np.ndarray) -> np.ndarray:
    """Mouth-corner distance over the inter-ocular distance, ``[F, 5, 2]`` -> ``[F]`` (unitless).

    Widens in a smile, narrows in an "o"; invariant to face size, position and roll.
    """
    return np.linalg.norm(points5[:, 4] - points5[:, 3], axis=-1) / np.maximum(interocular(points5), 1e-9)


def _median_patch(a: np.ndarray, centre, half: float) -> float:
    x, y = int(round(centre[0])), int(round(centre[1]))
    h = max(1, int(round(half)))
    patch = a[max(y - h, 0):y + h + 1, max(x - h, 0):x + h + 1]
    return float(np.median(patch)) if patch.size else float(np.median(a))


def _trimmed_mean(x: np.ndarray) -> float:
    """Mean of the middle half (robust to a few odd columns: a tooth gap, a stray hair)."""
    x = np.sort(np.asarray(x, np.float64).ravel())
    k = len(x) // 4
    return float(x[k:len(x) - k].mean()) if len(x) else 0.0


def _interior_height(lab_l, lab_c, rows: slice, cols: slice, skin_l: float, skin_c: float) -> float:
    """Trimmed mean over the columns of ``rows × cols`` of the count of "interior" pixels: darker
    than ``_DARK`` × skin lightness (pupil, iris, lashes, mouth cavity) or pale and achromatic
    (sclera, teeth)."""
    l, c = lab_l[rows, cols], lab_c[rows, cols]
    interior = (l < _DARK * skin_l) | ((c < _PALE_CHROMA * skin_c) & (l > _PALE_LIGHT * skin_l))
    return _trimmed_mean(interior.sum(0)) if interior.size else 0.0


def crop_curves(crops: np.ndarray, points5: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eye openness and mouth opening from aligned face crops and their 5 landmarks (the fallback
    when no dense landmarks are available).

    With only 5 points (eye centres, nose tip, mouth corners) an eyelid or lip gap has no landmark
    of its own, so it is measured in the image: in CIELAB, a pixel is *interior* when it is darker
    than 0.6 × the local skin lightness (pupil, iris, lashes, mouth cavity) or pale and achromatic
    (chroma < 0.6 × skin, lightness > 0.9 × skin: sclera, teeth). Skin is the median of a patch
    just below each eye (for that eye) and between nose tip and mouth (for the mouth), so shading
    on a turned head changes the reference with the face.

    * eye openness: per eye, the height of interior pixels in a window of ±0.10 IOD around the eye
      landmark, 0.24 IOD wide (trimmed mean over columns), averaged over both eyes, in IOD.
    * mouth opening: the height of interior pixels in a window from 0.2 IOD above to 0.6 IOD below
      the mouth-corner midpoint, over the central half of the mouth width, in IOD.

    Limits (documented in the README): the values are heights of dark/pale regions, not landmark
    gaps: lashes and the lip line give a floor of about 0.02–0.05 for closed eyes and about 0.05–0.1
    for a closed mouth; glasses, heavy make-up, moustaches and deep side shadows add to it;
    squinting eyes at low resolution lose the sclera. Against MediaPipe Face Mesh gaps the mouth
    curve correlates at r 0.96 / 0.48 (jgz 20 frames / trump 60 frames), the eye curve at only
    0.28 / 0.39. Compare curves of the same measurement only.

    Args:
        crops: uint8 ``[F, S, S, 3]`` RGB aligned crops; points5: ``[F, 5, 2]`` landmarks in the crop.
    Returns:
        (eye ``[F]``, mouth ``[F]``) float64, in inter-ocular distances.
    """
    eye, mouth = np.zeros(len(crops)), np.zeros(len(crops))
    for i, (crop, p) in enumerate(zip(crops, points5)):
        lab = cv2.cvtColor(crop, cv2.COLOR_RGB2LAB).astype(np.float32)
        light = lab[..., 0]
        chroma = np.hypot(lab[..., 1] - 128.0, lab[..., 2] - 128.0)
        iod = max(float(np.linalg.norm(p[1] - p[0])), 1e-6)

        def window(cx, cy, left, right, up, down):
            return (slice(max(int(round(cy - up)), 0), max(int(round(cy + down)), 0)),
                    slice(max(int(round(cx - left)), 0), max(int(round(cx + right)), 0)))

        eyes = []
        for x, y in p[:2]:
            below = (x, y + 0.3 * iod)
            rows, cols = window(x, y, _EYE_HALF_WIDTH * iod, _EYE_HALF_WIDTH * iod, _EYE_ABOVE * iod, _EYE_BELOW * iod)
            eyes.append(_interior_height(light, chroma, rows, cols, _median_patch(light, below, 0.08 * iod),
                                         _median_patch(chroma, below, 0.08 * iod)) / iod)
        eye[i] = np.mean(eyes)
        centre = (p[3] + p[4]) / 2
        half = _MOUTH_HALF_WIDTH * float(np.linalg.norm(p[4] - p[3]))
        skin = p[2] + 0.35 * (centre - p[2])
        rows, cols = window(centre[0], centre[1], half, half, _MOUTH_ABOVE * iod, _MOUTH_BELOW * iod)
        mouth[i] = _interior_height(light, chroma, rows, cols, _median_patch(light, skin, 0.06 * iod),
                                    _median_patch(chroma, skin, 0.06 * iod)) / iod
    return eye, mouth


def mesh_curves(mesh: np.ndarray, points5: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eye openness and mouth opening from dense MediaPipe Face Mesh landmarks.

    Eye: mean over both eyes of the upper-to-lower eyelid distance (points 159–145 and 386–374);
    mouth: inner-lip distance (13–14); both over the inter-ocular distance of the 5 landmarks, as
    in the eye/mouth aspect ratios of Soukupová & Čech (CVWW 2016) with one lid pair per eye.

    Args:
        mesh: ``[F, 468+, 2]`` Face Mesh points; points5: ``[F, 5, 2]`` in the same pixels.
    Returns:
        (eye ``[F]``, mouth ``[F]``) in inter-ocular distances.
    """
    mesh = np.asarray(mesh, np.float64)
    iod = np.maximum(interocular(points5), 1e-9)
    eye = np.mean([np.linalg.norm(mesh[:, a] - mesh[:, b], axis=-1) for a, b in _MESH_LIDS], axis=0) / iod
    mouth = np.linalg.norm(mesh[:, _MESH_LIPS[0]] - mesh[:, _MESH_LIPS[1]], axis=-1) / iod
    return eye, mouth


class MeshLandmarker:
    """MediaPipe Face Mesh on aligned crops, when the installed mediapipe ships it (0.10.x up to
    0.10.21 carries ``face_landmark.tflite`` in its wheel; 0.10.3x and 1.x ship no models).

    Raises:
        ImportError: when mediapipe (with ``mp.solutions.face_mesh``) is not installed.
    """

    def __init__(self):
        import mediapipe as mp  # noqa: F401 - optional

        solutions = getattr(mp, "solutions", None)
        if solutions is None or not hasattr(solutions, "face_mesh"):
            raise ImportError("this mediapipe has no bundled Face Mesh (mp.solutions.face_mesh); "
                              "pip install 'mediapipe==0.10.21' (numpy < 2, Python <= 3.12)")
        self._mesh = solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=False,
                                                  min_detection_confidence=0.3)

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        """uint8 ``[F, S, S, 3]`` -> ``[F, 468, 2]`` crop pixels; frames where the mesh fails are
        filled from neighbouring frames (all NaN if none succeeds)."""
        out = np.full((len(crops), 468, 2), np.nan)
        ok = np.zeros(len(crops), bool)
        for i, crop in enumerate(crops):
            res = self._mesh.process(np.ascontiguousarray(crop))
            if res.multi_face_landmarks:
                pts = res.multi_face_landmarks[0].landmark
                out[i] = [(q.x * crop.shape[1], q.y * crop.shape[0]) for q in pts[:468]]
                ok[i] = True
        return fill_missing(out, ok) if ok.any() else out

    def close(self):
        self._mesh.close()


def make_mesh_landmarker(source: str):
    """The dense landmarker for ``source`` (``auto`` | ``mesh`` | ``crop``), or ``None`` for the
    crop fallback.

    Raises:
        ValueError: unknown source; ImportError: ``mesh`` asked for but mediapipe's mesh is missing.
    """
    if source not in LANDMARK_SOURCES:
        raise ValueError(f"landmarks must be one of {LANDMARK_SOURCES}, got {source!r}")
    if source == "crop":
        return None
    try:
        return MeshLandmarker()
    except ImportError:
        if source == "mesh":
            raise
        return None


@dataclass
class FaceMotion:
    """What is measured of one face through a clip (one entry per frame).

    Attributes:
        track: the face track (``track.missing``: frames filled from neighbours).
        features: float32 ``[F, 554]`` PD-FGC features, or ``None`` without an encoder.
        curves: name -> float64 ``[F]`` for each of :data:`CURVES`.
        embeddings: float ``[K, D]`` identity embeddings of the detected frames (``[0, 0]`` if none).
    """

    track: FaceTrack
    features: torch.Tensor | None
    curves: dict
    embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    def __len__(self) -> int:
        return len(self.track)

    def frames(self, index) -> "FaceMotion":
        """The same measurements for ``index`` (a slice or index array) of the frames, e.g.
        ``[5:]`` for a clip starting 5 frames later or ``[::-1]`` for the clip played backwards."""
        t = self.track
        track = FaceTrack(t.boxes[index], t.landmarks[index], t.detected[index], t.embeddings)
        return FaceMotion(track, None if self.features is None else self.features[index],
                          {k: v[index] for k, v in self.curves.items()}, self.embeddings)


def face_motion(frames: np.ndarray, track: FaceTrack, encoder=None, mesh=None,
                features: torch.Tensor | None = None) -> FaceMotion:
    """Measure one tracked face in ``frames`` (uint8 ``[F, H, W, 3]``, ``F == len(track)``).

    PD-FGC features come from the 224×224 crops of :func:`~.expression.align_face`, as in
    generation (:func:`~.drive.encode.encode_driving`), unless given as ``features [F, 554]`` (e.g. the
    ones the generation itself computed); curves from :data:`MEASURE_SIZE` crops, by ``mesh``
    (:class:`MeshLandmarker`) or else :func:`crop_curves`.
    """
    from fantasyportrait_core.model.expression import align_face

    if len(frames) != len(track):
        raise ValueError(f"{len(frames)} frames for a face track of {len(track)} frames")
    if features is None and encoder is not None:
        crops224 = np.stack([align_face(f, lm, CROP_SIZE) for f, lm in zip(frames, track.landmarks)])
        features = encode_expressions(encoder, crops224)
    crops, points = aligned_measure_crops(frames, track.landmarks)
    eye, mouth = mesh_curves(mesh(crops), points) if mesh is not None else crop_curves(crops, points)
    embs = [e for e in track.embeddings if e is not None]
    return FaceMotion(track, features, {"eye_openness": eye, "mouth_opening": mouth, "mouth_width": mouth_width(points)},
                      np.stack(embs) if embs else np.zeros((0, 0)))


def measure_driving(detector, clips: list[np.ndarray], people: int | None = None, encoder=None,
                    mesh=None) -> list[FaceMotion]:
    """Each character's :class:`FaceMotion` in the driving clip(s), by the generation's rule:
    ``people`` faces from a single clip (tracked, left to right), else one face per clip.

    Args:
        clips: uint8 ``[F, H, W, 3]`` RGB each.
    Raises:
        ValueError: no face, fewer faces than ``people``, or ``people`` not matching the clip count.
    """
    people = people or len(clips)
    if people > 1 and len(clips) == 1:
        tracks = track_faces(detect_video(detector, clips[0]), max_people=people)
        if len(tracks) < people:
            raise ValueError(f"the driving video shows {len(tracks)} face(s) but people={people}; "
                             f"lower people or use a video showing everybody")
        return [face_motion(clips[0], t, encoder, mesh) for t in tracks]
    if people != len(clips):
        raise ValueError(f"people={people} with {len(clips)} driving videos: give one video per character "
                         f"or a single video showing all {people}")
    return [face_motion(c, track_faces(detect_video(detector, c), max_people=1)[0], encoder, mesh) for c in clips]


def measure_generated(detector, frames: np.ndarray, count: int, encoder=None, mesh=None,
                      assign: str = "left_to_right", face_order: list[int] | None = None,
                      driver_embeddings: list | None = None) -> list[FaceMotion]:
    """Each character's :class:`FaceMotion` in the generated video, faces matched to characters by
    :func:`match_generated_faces`.

    Raises:
        ValueError: no face, or fewer faces than characters.
    """
    found = detect_video(detector, frames)
    if not any(found):
        raise ValueError(f"no face was found in any of the {len(frames)} generated frames")
    tracks = match_generated_faces(track_faces(found), count, face_order, assign, driver_embeddings)
    return [face_motion(frames, t, encoder, mesh) for t in tracks]


# ----------------------------------------------------------------------------------------------
# Metrics


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two ``[F]`` curves; ``None`` when either is constant (undefined)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    da, db = a - a.mean(), b - b.mean()
    na, nb = np.sqrt((da * da).sum()), np.sqrt((db * db).sum())
    if na < 1e-12 or nb < 1e-12:
        return None
    return float(np.clip((da * db).sum() / (na * nb), -1.0, 1.0))


def curve_metrics(driving: np.ndarray, generated: np.ndarray) -> dict:
    """Agreement of two per-frame curves (eye openness, mouth opening, mouth width).

    * ``pearson``: Pearson correlation (1 = same shape over time; scale- and offset-free).
    * ``mae``: mean absolute error, in the curve's units (inter-ocular distances): FantasyPortrait
      §4 measures eye motion by such an MAE.
    * ``relative``: ``mae / spread``, spread = mean absolute deviation of the driving curve from its
      mean (floored at 0.01 IOD: a static driver).
    * ``score``: ``1 / (1 + relative)``.

    Args:
        driving, generated: float ``[F]``, same length.
    Raises:
        ValueError: if the lengths differ.
    """
    d, g = np.asarray(driving, np.float64), np.asarray(generated, np.float64)
    if d.shape != g.shape:
        raise ValueError(f"curves differ in length: driving {d.shape}, generated {g.shape}")
    mae = float(np.abs(g - d).mean())
    spread = max(float(np.abs(d - d.mean()).mean()), _CURVE_SPREAD_FLOOR)
    rel = mae / spread
    return {"pearson": pearson(d, g), "mae": mae, "relative": rel, "score": 1.0 / (1.0 + rel)}


def feature_metrics(driving: torch.Tensor, generated: torch.Tensor, part: slice) -> dict:
    """AED/APD-style distance of PD-FGC features (``part``: :data:`EXPRESSION` or :data:`POSE`).

    * ``distance``: mean over frames of ``||g_t - d_t||_2`` on the features in ``part``.
    * ``relative``: ``distance / spread``, spread = mean over frames of ``||d_t - mean_t d||_2``
      (how far the driver moves from its own average): 1 = no closer than a frozen average face.
    * ``score``: ``1 / (1 + relative)``; ``per_frame``: the relative per-frame distances (plot).

    Args:
        driving, generated: float ``[F, 554]``.
    """
    d, g = driving[:, part].double(), generated[:, part].double()
    per_frame = (g - d).norm(dim=1)
    spread = max(float((d - d.mean(0)).norm(dim=1).mean()), _FEATURE_SPREAD_FLOOR)
    dist = float(per_frame.mean())
    rel = dist / spread
    return {"distance": dist, "relative": rel, "score": 1.0 / (1.0 + rel),
            "per_frame": (per_frame / spread).numpy()}


def identity_metrics(reference: np.ndarray | None, generated: np.ndarray) -> dict | str:
    """Cosine similarity of ArcFace embeddings ``generated [K, D]`` to ``reference [D]``: mean and
    minimum over the frames where the face was detected; a "not measured" string without embeddings."""
    if reference is None or generated.size == 0:
        return "not measured: needs identity embeddings (insightface face detector)"
    r = reference / (np.linalg.norm(reference) + 1e-12)
    g = generated / (np.linalg.norm(generated, axis=1, keepdims=True) + 1e-12)
    cos = g @ r
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "frames": int(len(cos))}


def overall_score(character: dict) -> float:
    """One number in (0, 1] for a character: the mean of the ``score`` of every motion metric that
    was measured (expression, head_pose, eye_openness, mouth_opening, mouth_width), each
    ``1 / (1 + relative error)``. 1 exactly when every curve and feature matches; 0.5 when the
    errors are as large as the driver's own movement. Identity is reported but not included (it is
    about appearance, not motion)."""
    scores = [character[k]["score"] for k in ("expression", "head_pose", *CURVES) if isinstance(character.get(k), dict)]
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------
# Whole videos


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


@dataclass
class Evaluation:
    """Result of :func:`compare` / :func:`evaluate`: ``report`` (JSON-ready dict) and the per-frame
    curves to plot (``series[character][metric] = (driving [F], generated [F])``, or
    ``(None, relative distance [F])`` for the PD-FGC metrics)."""

    report: dict
    series: list[dict]


def compare(drivers: list[FaceMotion], generated: list[FaceMotion], reference_embeddings: list | None = None) -> Evaluation:
    """Metrics of each generated face against its driver, frame by frame.

    Args:
        drivers, generated: one :class:`FaceMotion` per character, same order, same frame count.
        reference_embeddings: per character the identity target embedding (``None`` entries: the
            generated face's own first embedding).
    Returns:
        :class:`Evaluation` (report without the run information :func:`evaluate` adds).
    Raises:
        ValueError: different character or frame counts.
    """
    if len(drivers) != len(generated) or not drivers:
        raise ValueError(f"{len(drivers)} driver(s) for {len(generated)} generated face(s)")
    characters, series = [], []
    for i, (d, g) in enumerate(zip(drivers, generated)):
        if len(d) != len(g):
            raise ValueError(f"character {i}: {len(d)} driving frames vs {len(g)} generated frames")
        ch = {"character": i, "generated_face_box": [round(float(v), 1) for v in g.track.boxes[0]],
              "frames_without_face": {"driving": d.track.missing, "generated": g.track.missing}}
        plot_data = {}
        if d.features is not None and g.features is not None:
            for key, part in (("expression", EXPRESSION), ("head_pose", POSE)):
                m = feature_metrics(d.features, g.features, part)
                plot_data[key] = (None, m.pop("per_frame"))
                ch[key] = m
            ch["expression"]["emotion_distance"] = feature_metrics(d.features, g.features, EMOTION)["distance"]
            ch["expression"]["mouth_feature_distance"] = feature_metrics(d.features, g.features, MOUTH)["distance"]
        else:
            ch["expression"] = ch["head_pose"] = "not measured: needs the PD-FGC expression encoder"
        for key in CURVES:
            ch[key] = curve_metrics(d.curves[key], g.curves[key])
            plot_data[key] = (d.curves[key], g.curves[key])
        ref = reference_embeddings[i] if reference_embeddings else None
        if ref is None and g.embeddings.size:
            ref = g.embeddings[0]
        ch["identity"] = identity_metrics(ref, g.embeddings)
        ch["overall"] = overall_score(ch)
        characters.append(ch)
        series.append(plot_data)
    report = {"characters": characters, "overall": float(np.mean([c["overall"] for c in characters]))}
    return Evaluation(report, series)


def reference_embeddings(detector, reference: np.ndarray, generated: list[FaceMotion],
                         generated_size: tuple[int, int]) -> list:
    """Per character, the embedding of the reference-image face nearest its generated face (boxes
    scaled to the generated ``(width, height)``); ``None`` where the detector gives no embedding."""
    faces = detector.detect(np.asarray(reference))
    if not faces:
        raise ValueError("no face found in the reference image")
    sx, sy = generated_size[0] / reference.shape[1], generated_size[1] / reference.shape[0]
    out = []
    for g in generated:
        box = g.track.boxes[0]
        centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        out.append(min(faces, key=lambda f: np.linalg.norm(f.center * [sx, sy] - centre)).embedding)
    return out


def evaluate(detector, driving: list[np.ndarray], generated: np.ndarray, people: int | None = None, encoder=None,
             reference: np.ndarray | None = None, assign: str = "left_to_right", face_order: list[int] | None = None,
             landmarks: str = "auto", encoder_random: bool = False) -> Evaluation:
    """Expression-fidelity metrics of ``generated`` against its driving video(s).

    Args:
        detector: a face detector (:func:`~fantasyportrait_core.faces.detect.make_detector`); its embeddings, if any
            (insightface), give the identity metric.
        driving: one uint8 ``[F, H, W, 3]`` RGB clip per character, or one clip showing ``people``
            characters; all at the generated video's frame rate (:func:`resample_frames`).
        generated: uint8 ``[G, H', W', 3]`` RGB; frame ``i`` is compared with driving frame ``i``
            over the first ``min(F, G)`` frames.
        people: characters (default: one per driving clip).
        encoder: PD-FGC :class:`~.expression.FanEncoder` (``None``: expression and head pose are
            "not measured").
        reference: optional uint8 ``[H, W, 3]`` reference image: the identity target (else the
            generated face in the first frame).
        assign, face_order: how generation paired characters with faces (:func:`~.faces.assign.assign_faces`).
        landmarks: ``auto`` (Face Mesh if mediapipe ships it, else the crop measurement),
            ``mesh`` or ``crop``.
        encoder_random: the encoder has random weights: the report says PD-FGC values are not meaningful.
    Returns:
        :class:`Evaluation`; ``report["seconds"]`` has the time of each stage.
    Raises:
        ValueError: empty or mismatched inputs, no face, fewer faces than characters (names the counts).
    """
    driving = [np.asarray(v) for v in driving]
    generated = np.asarray(generated)
    if not driving:
        raise ValueError("no driving video given")
    for name, v in [("generated", generated)] + [(f"driving #{i}", v) for i, v in enumerate(driving)]:
        if v.ndim != 4 or v.shape[-1] != 3 or v.dtype != np.uint8 or len(v) == 0:
            raise ValueError(f"{name} frames must be uint8 [F>0, H, W, 3] RGB, got {v.dtype} {v.shape}")
    if assign not in ASSIGN_MODES:
        raise ValueError(f"unknown assignment {assign!r}; choose one of {ASSIGN_MODES}")
    n = min(len(generated), *(len(v) for v in driving))
    if len(generated) > n:
        log.warning("[FantasyPortrait] evaluation: the generated video has %d frames, its driver only %d; "
                    "the last %d generated frames are not compared", len(generated), n, len(generated) - n)
    clips = [v[:n] for v in driving]
    gen = generated[:n]
    seconds = {}
    mesh = make_mesh_landmarker(landmarks)
    try:
        t = time.perf_counter()
        d_motion = measure_driving(detector, clips, people, encoder, mesh)
        seconds["driving"] = time.perf_counter() - t
        t = time.perf_counter()
        g_motion = measure_generated(detector, gen, len(d_motion), encoder, mesh, assign, face_order,
                                     [np.mean(d.embeddings, axis=0) if d.embeddings.size else None for d in d_motion])
        seconds["generated"] = time.perf_counter() - t
        refs = None
        if reference is not None:
            refs = reference_embeddings(detector, reference, g_motion, (gen.shape[2], gen.shape[1]))
    finally:
        if mesh is not None:
            mesh.close()
    ev = compare(d_motion, g_motion, refs)
    ev.report = {
        "frames_compared": int(n),
        "frames_ignored": {"generated": int(len(generated) - n), "driving": [int(len(v) - n) for v in driving]},
        "landmarks": "mesh (MediaPipe Face Mesh)" if mesh is not None else "crop (5 landmarks + aligned crop)",
        "expression_encoder": ("none" if encoder is None else
                               "RANDOM weights: expression/head_pose values are not meaningful" if encoder_random
                               else "PD-FGC"),
        "identity_target": "reference image" if reference is not None else "first generated frame",
        **ev.report,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    return ev


# ----------------------------------------------------------------------------------------------
# Output


def _fmt(v, digits=3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def format_table(report: dict) -> str:
    """The report as a fixed-width text table (one block per character)."""
    lines = [f"FantasyPortrait evaluation: overall {report['overall']:.3f}  ({report['frames_compared']} frames; "
             f"landmarks: {report['landmarks']}; expression encoder: {report['expression_encoder']})"]
    for ch in report["characters"]:
        lines.append(f"character {ch['character']}: overall {ch['overall']:.3f}")
        lines.append(f"  {'metric':<15}{'distance/MAE':>13}{'relative':>10}{'pearson':>9}{'score':>8}")
        for key in ("expression", "head_pose", *CURVES):
            m = ch[key]
            if isinstance(m, str):
                lines.append(f"  {key:<15}{m}")
                continue
            dist = m.get("distance", m.get("mae"))
            lines.append(f"  {key:<15}{_fmt(dist, 4):>13}{_fmt(m['relative']):>10}{_fmt(m.get('pearson')):>9}"
                         f"{_fmt(m['score']):>8}")
        ident = ch["identity"]
        lines.append(f"  {'identity':<15}" + (ident if isinstance(ident, str) else
                                            f"cosine mean {ident['cosine_mean']:.3f}, min {ident['cosine_min']:.3f}"))
    return "\n".join(lines)


def json_ready(report: dict) -> dict:
    """``report`` with numpy scalars/arrays turned into plain Python (for ``json.dump``)."""
    def conv(v):
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, np.ndarray):
            return v.tolist()
        if isinstance(v, np.generic):
            return v.item()
        return v

    return conv(report)


_TITLES = {"expression": "expression distance (relative)", "head_pose": "head-pose distance (relative)",
           "eye_openness": "eye openness (IOD)", "mouth_opening": "mouth opening (IOD)",
           "mouth_width": "mouth width (IOD)"}


def plot(evaluation: Evaluation, title: str = "") -> np.ndarray:
    """Per-frame curves, one row per character and one panel per metric: driving vs generated for
    the landmark curves, the per-frame relative distance for the PD-FGC metrics; the title carries
    the overall score, each panel its own score.

    Returns:
        uint8 ``[H, W, 3]`` RGB image (matplotlib, Agg backend; no display needed).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the evaluation plot needs matplotlib: pip install matplotlib") from e

    report, series = evaluation.report, evaluation.series
    keys = [k for k in ("expression", "head_pose", *CURVES) if any(k in s for s in series)]
    rows, cols = len(series), len(keys)
    random_encoder = "RANDOM" in str(report.get("expression_encoder", ""))
    fig = Figure(figsize=(3.4 * cols, 2.5 * rows + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, (plot_data, ch) in enumerate(zip(series, report["characters"])):
        for c, key in enumerate(keys):
            ax = axes[r, c]
            d, g = plot_data[key]
            m = ch[key]
            if d is None:
                ax.plot(g, color="tab:red", lw=1.2, label="generated vs driving")
                ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
                sub = f"score {m['score']:.2f}" + ("  [RANDOM encoder]" if random_encoder else "")
            else:
                ax.plot(d, color="tab:blue", lw=1.2, label="driving")
                ax.plot(g, color="tab:orange", lw=1.2, label="generated")
                sub = f"r {_fmt(m['pearson'], 2)}  MAE {m['mae']:.3f}  score {m['score']:.2f}"
            ax.set_title(f"#{ch['character']} {_TITLES[key]}\n{sub}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_xlabel("frame", fontsize=7)
            if r == 0 and c in (0, cols - 1):
                ax.legend(fontsize=6, loc="upper right")
    head = f"overall {report['overall']:.3f}" + "".join(
        f"   #{ch['character']}: {ch['overall']:.3f}" for ch in report["characters"])
    fig.suptitle(f"{title}  {head}".strip(), fontsize=11)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


__all__ = ["Evaluation", "FaceMotion", "MeshLandmarker", "aligned_measure_crops", "compare", "crop_curves",
           "curve_metrics", "evaluate", "face_motion", "measure_driving", "measure_generated", "reference_embeddings", "feature_metrics", "format_table", "identity_metrics", "json_ready",
           "match_generated_faces", "mesh_curves", "mouth_width", "overall_score", "pearson", "plot",
           "resample_frames", "LANDMARK_SOURCES", "CURVES"]

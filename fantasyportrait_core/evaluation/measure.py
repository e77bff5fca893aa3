"""What is measured of one face through a clip (:class:`FaceMotion`): PD-FGC features of the
aligned crops and the per-frame eye / mouth curves, from MediaPipe Face Mesh landmarks or from the
aligned crop itself (:func:`mesh_curves` / :func:`crop_curves`); :func:`measure_driving` and
:func:`measure_generated` measure every tracked face of a video."""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from fantasyportrait_core.evaluation.match import match_generated_faces
from fantasyportrait_core.faces.face import Face, FaceTrack, detect_video, fill_missing, track_faces
from fantasyportrait_core.model.expression import ALIGN_TEMPLATE, CROP_SIZE, encode_expressions, umeyama

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
    :func:`~.match.match_generated_faces`.

    Raises:
        ValueError: no face, or fewer faces than characters.
    """
    found = detect_video(detector, frames)
    if not any(found):
        raise ValueError(f"no face was found in any of the {len(frames)} generated frames")
    tracks = match_generated_faces(track_faces(found), count, face_order, assign, driver_embeddings)
    return [face_motion(frames, t, encoder, mesh) for t in tracks]

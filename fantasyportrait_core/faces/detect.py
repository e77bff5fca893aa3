"""Face detector backends, one interface: ``detect(image RGB uint8) -> list[Face]`` left to right,
each face with a box, 5 landmarks (left eye, right eye, nose tip, left/right mouth corner, in
image terms), a score and, where the backend has one, an identity embedding.

* ``auto`` (default): ``official`` when ``face_det.onnx`` + ``face_landmark.onnx`` are in the model
  folder and onnxruntime imports (the landmarks FantasyPortrait was trained with), else ``mtcnn``
  (:func:`choose_auto_backend`).
* ``mtcnn`` (offline): MTCNN (P/R/O-Net cascade: boxes + 5 landmarks) from ``facenet-pytorch``,
  whose wheel ships the weights; runs on numpy 2 and Python 3.10–3.13.
* ``mediapipe`` (optional, offline): BlazeFace short- and full-range + Face Mesh, models inside the
  mediapipe 0.10.21 wheel (numpy < 2, Python <= 3.12 only).
* ``insightface``: ``buffalo_l`` / ``antelopev2`` from ``ComfyUI/models/insightface`` (SCRFD
  detection, 5 keypoints, ArcFace identity embedding).
* ``official``: the FantasyPortrait release's ``face_det.onnx`` (NanoDet-style GFL detector) +
  ``face_landmark.onnx`` (222 points), run with onnxruntime; pre/post-processing follows the
  reference ``diffsynth/models/face_det.py`` / ``face_align.py`` exactly (letterbox 160×272, GFL
  decoding, hard NMS, 3-pass landmark refinement, points 182/202/36/149/133 for alignment; checked
  against a literal port in tests/test_official_parity.py), plus portrait tiles on landscape images
  where the letterbox makes faces too small (:meth:`OfficialOnnxDetector.find_boxes`).

mediapipe, insightface and onnxruntime are optional (not in requirements.txt): a backend whose
package is missing raises a one-line :class:`ImportError` naming the pip command
(:mod:`fantasyportrait_core.faces.packages`); see docs/INSTALL.md for the onnxruntime /
onnxruntime-gpu trap.
"""

from __future__ import annotations

import logging
import os

from fantasyportrait_core.faces.insightface import InsightFaceDetector
from fantasyportrait_core.faces.mediapipe import MediaPipeDetector
from fantasyportrait_core.faces.mtcnn import MtcnnDetector
from fantasyportrait_core.faces.official import DET_SCORE, OFFICIAL_FILES, OfficialOnnxDetector
from fantasyportrait_core.faces.packages import BACKEND_PACKAGES, missing_packages, onnxruntime_problem

log = logging.getLogger("FantasyPortrait")


BACKENDS = ("auto", "mtcnn", "mediapipe", "insightface", "official")

# Each backend's own confidence threshold (used when none is given).
DEFAULT_MIN_SCORE = {"mtcnn": 0.9, "mediapipe": 0.5, "insightface": 0.5, "official": DET_SCORE}


def default_model_dir(backend: str) -> str:
    """Where a backend's files are looked for when no folder is given (relative to the working directory)."""
    return os.path.join("models", "insightface" if backend == "insightface" else "fantasyportrait")


def choose_auto_backend(model_dir: str | None) -> tuple[str, str]:
    """What ``auto`` runs: ``("official", why)`` when both files of :data:`OFFICIAL_FILES` are in
    ``model_dir`` and onnxruntime is installed, else ``("mtcnn", why)``.

    ``why`` is one line for logs and previews, e.g. ``"no face_det.onnx in models/fantasyportrait"``.
    onnxruntime is imported (not the models) only when both files are there, to catch a broken install.
    """
    d = model_dir or default_model_dir("official")
    absent = [f for f in OFFICIAL_FILES if not os.path.isfile(os.path.join(d, f))]
    if absent:
        return "mtcnn", f"no {' / '.join(absent)} in {d}"
    if missing_packages("official"):
        return "mtcnn", (f"{' + '.join(OFFICIAL_FILES)} found in {d} but onnxruntime is not installed "
                         f"({BACKEND_PACKAGES['official'][1]})")
    broken = onnxruntime_problem()
    if broken:
        return "mtcnn", f"{' + '.join(OFFICIAL_FILES)} found in {d} but {broken}"
    return "official", f"{' + '.join(OFFICIAL_FILES)} found in {d}"


def check_detector_files(backend: str, model_dir: str | None, name: str = "detector_dir") -> None:
    """Before any model work: the folder ``insightface`` (its root holding ``models/buffalo_l``) or
    ``official`` (:data:`OFFICIAL_FILES`) needs; ``auto`` and the others need none.

    Raises:
        InputError: naming ``name``, the folder or file and what it must hold.
    """
    from fantasyportrait_core.validate import check_input_dir, check_input_file

    if backend not in ("insightface", "official"):
        return
    what = "insightface root (holding models/buffalo_l)" if backend == "insightface" else \
        "folder with face_det.onnx and face_landmark.onnx"
    check_input_dir(model_dir, name, what)
    if backend == "official":
        for f in OFFICIAL_FILES:
            check_input_file(os.path.join(model_dir, f), name, f)


def make_detector(backend: str = "auto", model_dir: str | None = None, min_score: float | None = None, **kw):
    """Build a detector by name.

    The returned detector has ``name`` (the backend that runs: never ``auto``) and ``info`` (one line
    for previews and reports: the backend, and for ``auto`` why it was chosen).

    Args:
        backend: ``auto`` | ``mtcnn`` | ``mediapipe`` | ``insightface`` | ``official``.
        model_dir: insightface root (``models/insightface``) or the folder with the official ONNX pair
            (``models/fantasyportrait``; also where ``auto`` looks).
        min_score: confidence threshold; ``None`` or 0 takes the backend's own (``DEFAULT_MIN_SCORE``).
        kw: backend options (``mtcnn``: ``min_face_size``, ``device``; ``insightface``: ``name``;
            ``official``: ``threads``).
    Raises:
        ValueError: unknown backend, or an official ONNX file onnxruntime cannot load;
        FileNotFoundError: missing model files (names the folder);
        BackendUnavailable (an ImportError): the backend's package is not installed (names the pip command).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown face detector backend {backend!r}; choose one of {BACKENDS}")
    reason = None
    if backend == "auto":
        backend, reason = choose_auto_backend(model_dir)
        # The user put the official files there to use them: say loudly when they cannot be.
        (log.warning if backend == "mtcnn" and " found in " in reason else log.info)(
            "[FantasyPortrait] face detector auto -> %s (%s)", backend, reason)
        if backend == "mtcnn":
            model_dir = None
    if not min_score:
        min_score = DEFAULT_MIN_SCORE[backend]
    if backend == "mtcnn":
        det = MtcnnDetector(min_score=min_score, **kw)
    elif backend == "mediapipe":
        det = MediaPipeDetector(min_score=min_score, **kw)
    elif backend == "insightface":
        det = InsightFaceDetector(model_dir or default_model_dir(backend), min_score=min_score, **kw)
    else:
        d = model_dir or default_model_dir(backend)
        det = OfficialOnnxDetector(*(os.path.join(d, f) for f in OFFICIAL_FILES), min_score=min_score, **kw)
    labels = {"official": "official onnx", "insightface": f"insightface {kw.get('name', 'buffalo_l')}"}
    label = labels.get(backend, backend)
    det.info = f"{label} (auto: {reason})" if reason else label
    return det

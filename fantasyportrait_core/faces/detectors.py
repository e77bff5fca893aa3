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
(:data:`BACKEND_PACKAGES`, :class:`BackendUnavailable`); see docs/INSTALL.md for the onnxruntime /
onnxruntime-gpu trap.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import cv2
import numpy as np

from fantasyportrait_core.faces.face import Face, box_containment, box_iou, check_image, nms, order_points

log = logging.getLogger("FantasyPortrait")

# What each backend imports and how to get it. Only mtcnn's package is in requirements.txt; the
# others would pin numpy < 2 (mediapipe) or replace onnxruntime-gpu with the CPU build (insightface).
BACKEND_PACKAGES = {
    "mtcnn": (("facenet_pytorch", "torchvision"), "pip install facenet-pytorch==2.5.3"),
    "mediapipe": (("mediapipe",), "pip install mediapipe==0.10.21 (Python <= 3.12 with numpy < 2 only; "
                                  "see docs/INSTALL.md)"),
    "insightface": (("insightface", "onnxruntime"), "pip install insightface, then reinstall onnxruntime-gpu if "
                                                    "you had it (see docs/INSTALL.md)"),
    "official": (("onnxruntime",), "pip install onnxruntime-gpu (NVIDIA GPU) or pip install onnxruntime (CPU)"),
}


class BackendUnavailable(ImportError):
    """A face detector backend's package is not installed (or is broken); the one-line message names
    the pip command that fixes it."""


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package, or a module with no spec
        return False


def missing_packages(backend: str) -> list[str]:
    """The import names ``backend`` needs that are not installed (empty when it can run)."""
    return [m for m in BACKEND_PACKAGES[backend][0] if not _importable(m)]


def require_backend(backend: str):
    """Raise a one-line :class:`BackendUnavailable` (an ImportError) naming the pip command when
    ``backend``'s packages are missing (checked without importing them)."""
    missing = missing_packages(backend)
    if missing:
        raise BackendUnavailable(f"face detector backend '{backend}' needs {' and '.join(missing)}, which is not "
                                 f"installed: {BACKEND_PACKAGES[backend][1]}")
    if "onnxruntime" in BACKEND_PACKAGES[backend][0]:
        broken = onnxruntime_problem()
        if broken:
            raise BackendUnavailable(f"face detector backend '{backend}': {broken}")


ORT_REPAIR = ("pip uninstall -y onnxruntime onnxruntime-gpu, then pip install onnxruntime-gpu (or onnxruntime "
              "without an NVIDIA GPU); see docs/INSTALL.md")


def onnxruntime_problem() -> str | None:
    """None when onnxruntime imports and has ``InferenceSession``, else one line saying how to repair
    it. onnxruntime and onnxruntime-gpu install into the same folder; after one of them is installed
    over or removed from under the other, the folder is left half-written."""
    try:
        import onnxruntime as ort

        ort.InferenceSession  # noqa: B018 - missing in a half-removed install
    except Exception as e:  # noqa: BLE001 - ImportError, AttributeError, OSError from its DLLs
        first = str(e).splitlines()[0] if str(e) else ""
        return f"onnxruntime is installed but broken ({type(e).__name__}: {first}): {ORT_REPAIR}"
    return None

# Face Mesh (478 points with iris refinement) indices: pupil centres (the reference's 222-point
# indices 182/202 are pupil centres too), nose tip, mouth corners.
_MESH_EYE_A = 468
_MESH_EYE_B = 473
_MESH_NOSE = 1
_MESH_MOUTH = (61, 291)


class MtcnnDetector:
    """Offline face detector: MTCNN (Zhang et al. 2016, "Joint Face Detection and Alignment using
    Multi-task Cascaded Convolutional Networks") as packaged by ``facenet-pytorch`` 2.5.3, whose
    wheel ships the P/R/O-Net weights (2 MB): nothing is downloaded.

    The O-Net gives 5 landmarks per face (eye centres, nose tip, mouth corners), the points the
    5-point alignment template uses. Frames of one size are detected as one batch.

    Args:
        min_score: final (O-Net) confidence threshold in [0, 1]. Real faces score >= 0.99 on the
            shared inputs; textures in the background reach 0.8, hence the default 0.9.
        min_face_size: smallest face side searched for, in pixels (smaller = slower).
        device: torch device (default: CUDA when available).
    Raises:
        BackendUnavailable: naming the pip command when facenet-pytorch (or torchvision) is missing.
    """

    name = "mtcnn"

    def __init__(self, min_score: float = 0.9, min_face_size: int = 20, device=None):
        require_backend("mtcnn")
        import torch
        from facenet_pytorch import MTCNN

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.min_score = float(min_score)
        self._mtcnn = MTCNN(keep_all=True, min_face_size=int(min_face_size), device=device,
                            thresholds=[0.6, 0.7, max(0.7, self.min_score)], post_process=False)

    def close(self):
        pass

    def detect_batch(self, images: np.ndarray) -> list[list[Face]]:
        """Faces in each of ``images`` (``[B, H, W, 3]`` uint8 RGB, one size), each list left to right."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 RGB frames [B, H, W, 3], got {images.dtype} {images.shape}")
        if len(images) == 0:
            return []
        h, w = images.shape[1:3]
        boxes, probs, points = self._mtcnn.detect(np.ascontiguousarray(images), landmarks=True)
        out = []
        for b, p, lm in zip(boxes, probs, points):
            faces = []
            if b is not None:
                for box, score, five in zip(b, p, lm):
                    if score is None or score < self.min_score:
                        continue
                    box = np.clip(np.asarray(box, np.float64), 0, [w, h, w, h])
                    if box[2] - box[0] < 2 or box[3] - box[1] < 2:
                        continue
                    faces.append(Face(box=box, landmarks=order_points(five), score=float(score)))
            out.append(sorted(faces, key=lambda f: f.center[0]))
        return out

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in ``image`` (``[H, W, 3]`` uint8 RGB), left to right."""
        return self.detect_batch(check_image(image)[None])[0]


class MediaPipeDetector:
    """Offline face detector: MediaPipe BlazeFace + Face Mesh (models inside the wheel).

    Both BlazeFace models run and their boxes are merged (NMS): the short-range model finds
    close-up faces (talking-head driving videos) that the full-range one misses, and the
    full-range one finds small faces in group shots. Face Mesh, run on a crop around each box,
    gives the 5 alignment points.

    Args:
        min_score: detection confidence threshold.
        crop_scale: side of the square crop given to Face Mesh, in face-box sizes.
    Raises:
        BackendUnavailable: naming the pip command when mediapipe is missing.
    """

    name = "mediapipe"

    def __init__(self, min_score: float = 0.5, crop_scale: float = 2.0):
        # mediapipe's C++ side logs feedback-tensor warnings for every graph; keep errors only.
        os.environ.setdefault("GLOG_minloglevel", "2")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        require_backend("mediapipe")
        import mediapipe as mp

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
        res = self._mesh.process(np.ascontiguousarray(image[y0:y1, x0:x1]))
        if not res.multi_face_landmarks:
            return None
        pts = np.array([(p.x * (x1 - x0) + x0, p.y * (y1 - y0) + y0) for p in res.multi_face_landmarks[0].landmark])
        five = np.stack([pts[_MESH_EYE_A], pts[_MESH_EYE_B], pts[_MESH_NOSE], pts[_MESH_MOUTH[0]], pts[_MESH_MOUTH[1]]])
        return order_points(five)

    @staticmethod
    def _keypoint_landmarks(det, w: int, h: int) -> np.ndarray:
        # BlazeFace keypoints: right eye, left eye, nose tip, mouth centre, two ear tragions.
        kp = np.array([(k.x * w, k.y * h) for k in det.location_data.relative_keypoints])
        eyes = kp[:2][np.argsort(kp[:2, 0])]
        half = (eyes[1] - eyes[0]) * 0.4  # mouth corners: mouth centre +- ~0.4 inter-eye distance
        return np.stack([eyes[0], eyes[1], kp[2], kp[3] - half, kp[3] + half])

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in ``image`` (``[H, W, 3]`` uint8 RGB), left to right.

        A face whose mesh fails gets landmarks from the detector's 6 keypoints instead (mouth
        corners estimated), with a debug log line.
        """
        image = check_image(image)
        h, w = image.shape[:2]
        found = []  # (box, score, keypoint landmarks)
        for x0, y0, x1, y1 in _tiles(w, h):
            tile = np.ascontiguousarray(image[y0:y1, x0:x1])
            tw, th = x1 - x0, y1 - y0
            for det_model in self._dets:
                for det in det_model.process(tile).detections or []:
                    bb = det.location_data.relative_bounding_box
                    box = np.array([bb.xmin * tw + x0, bb.ymin * th + y0, (bb.xmin + bb.width) * tw + x0,
                                    (bb.ymin + bb.height) * th + y0])
                    box = np.clip(box, 0, [w, h, w, h])
                    if box[2] - box[0] >= 2 and box[3] - box[1] >= 2:
                        found.append((box, float(det.score[0]), self._keypoint_landmarks(det, tw, th) + [x0, y0]))
        keep = nms(np.array([b for b, _, _ in found]).reshape(-1, 4), np.array([s for _, s, _ in found]))
        faces = []
        for box, score, kp in (found[i] for i in keep):
            lm = self._landmarks(image, box)
            if lm is None:
                log.debug("[FantasyPortrait] face mesh failed on a face box; using detector keypoints")
                lm = kp
            faces.append(Face(box=box, landmarks=lm, score=score))
        return sorted(faces, key=lambda f: f.center[0])


def _tiles(w: int, h: int, max_aspect: float = 1.34) -> list[tuple[int, int, int, int]]:
    """The whole image, plus overlapping near-square tiles along the long side of a wide or tall
    image: BlazeFace sees a 128/192 px downscale, so faces in a wide group shot get too small."""
    tiles = [(0, 0, w, h)]
    long, short = max(w, h), min(w, h)
    if long / short <= max_aspect:
        return tiles
    side = int(short * max_aspect)
    n = int(np.ceil((long - side) / (side / 2))) + 1
    for start in np.linspace(0, long - side, n).astype(int):
        tiles.append((start, 0, start + side, h) if w >= h else (0, start, w, start + side))
    return tiles


def _portrait_tiles(w: int, h: int, max_aspect: float = 1.34) -> list[tuple[int, int]]:
    """Column ranges ``(x0, x1)`` of overlapping full-height tiles with the official detector's
    160:272 aspect, half a tile apart, covering a landscape image (``w > max_aspect · h``); none
    otherwise (the whole-image pass already sees such an image at a usable scale)."""
    if w <= max_aspect * h:
        return []
    side = max(1, int(round(h * _DET_SIZE[0] / _DET_SIZE[1])))
    n = int(np.ceil((w - side) / (side / 2))) + 1
    return [(int(x), int(x) + side) for x in np.linspace(0, w - side, n).astype(int)]


def _onnx_providers():
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class InsightFaceDetector:
    """insightface ``FaceAnalysis`` (SCRFD + ArcFace) from a local model folder; never downloads.

    Args:
        root: the insightface root (``ComfyUI/models/insightface``), holding ``models/<name>/*.onnx``.
        name: ``buffalo_l`` or ``antelopev2``.
    Raises:
        FileNotFoundError: naming the folder to put the model pack in.
        BackendUnavailable: naming the pip command when insightface or onnxruntime is missing.
    """

    name = "insightface"

    def __init__(self, root: str, name: str = "buffalo_l", min_score: float = 0.5, det_size: int = 640):
        require_backend("insightface")
        model_dir = os.path.join(root, "models", name)
        if not os.path.isdir(model_dir) or not any(f.endswith(".onnx") for f in os.listdir(model_dir)):
            raise FileNotFoundError(
                f"insightface model pack '{name}' not found: put its .onnx files in {model_dir} "
                f"(unzip {name}.zip from the insightface releases there); nothing is downloaded automatically")
        from insightface.app import FaceAnalysis

        providers = _onnx_providers()
        self.app = FaceAnalysis(name=name, root=root, allowed_modules=["detection", "recognition"], providers=providers)
        self.app.prepare(ctx_id=0 if "CUDAExecutionProvider" in providers else -1, det_thresh=min_score,
                         det_size=(det_size, det_size))

    def detect(self, image: np.ndarray) -> list[Face]:
        image = check_image(image)
        faces = []
        for f in self.app.get(np.ascontiguousarray(image[..., ::-1])):  # insightface takes BGR
            emb = getattr(f, "normed_embedding", None)
            faces.append(Face(box=np.asarray(f.bbox, float), landmarks=order_points(np.asarray(f.kps, float)),
                              score=float(f.det_score), embedding=None if emb is None else np.asarray(emb, float)))
        return sorted(faces, key=lambda f: f.center[0])

    def close(self):
        pass


# ------------------------------------------------------------------------- official ONNX pair
#
# Every step below follows the FantasyPortrait release (Fantasy-AMAP/fantasy-portrait, commit 4df229c):
# detector = diffsynth/models/face_det.py (NanoDetABC / FaceDet), landmarks = face_align.py
# (FaceAlignment.forward) with the crops of face_utils.py. tests/reference_face.py is a literal port of
# those files and tests/test_official_parity.py checks this code against it on the shared inputs.

_DET_SIZE = (160, 272)  # network input (w, h)
_DET_MEAN = np.array([103.53, 116.28, 123.675], np.float32)  # BGR, 0..255
_DET_STD = np.array([57.375, 57.12, 58.395], np.float32)
_DET_STRIDES = (8, 16, 32)
_DET_BINS = 8  # GFL reg_max 7 -> 8 bins per side
_DET_SCORE, _DET_NMS_IOU, _DET_CANDIDATES = 0.4, 0.3, 200
_LM_SIZE, _LM_MARGIN, _LM_PASSES = 128, 0.15, 3
_LM_FIVE = [182, 202, 36, 149, 133]  # left pupil, right pupil, nose tip, left/right mouth corner
_LM_ROLL = (74, 96)  # outer corners of the image-left and image-right eyes
_LM_MIN_PROB = 1e-4  # the reference tracker's face_prob_th (camer.py)


def letterbox_matrix(width: int, height: int, size=_DET_SIZE) -> np.ndarray:
    """2×3 affine: keep-ratio resize of a ``width × height`` image, centred in ``size`` (w, h)
    (reference ``get_resize_matrix(..., keep_ratio=True)``, float64)."""
    tw, th = size
    ratio = th / height if width / height < tw / th else tw / width
    return np.array([[ratio, 0, tw / 2 - ratio * width / 2], [0, ratio, th / 2 - ratio * height / 2]], np.float64)


def decode_gfl(scores: list[np.ndarray], dists: list[np.ndarray], size=_DET_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Decode GFL heads (per stride: scores ``[N]``, distributions ``[N, 4·bins]``) into boxes in
    network-input pixels. Anchor centres are ``(col·s, row·s)``, row-major, no half-cell offset
    (reference ``NanoDetABC.postprocess``)."""
    tw, th = size
    boxes, probs = [], []
    for s, sc, d in zip(_DET_STRIDES, scores, dists):
        fw, fh = -(-tw // s), -(-th // s)
        rows, cols = np.divmod(np.arange(fh * fw), fw)
        cx, cy = cols * s, rows * s
        logits = d.reshape(-1, _DET_BINS)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        ltrb = (p * np.arange(_DET_BINS)).sum(1).reshape(-1, 4) * s
        boxes.append(np.stack([cx - ltrb[:, 0], cy - ltrb[:, 1], cx + ltrb[:, 2], cy + ltrb[:, 3]], 1))
        probs.append(sc.reshape(-1))
    return np.concatenate(boxes), np.concatenate(probs)


def hard_nms(boxes: np.ndarray, scores: np.ndarray, iou: float = _DET_NMS_IOU,
             candidates: int = _DET_CANDIDATES) -> list[int]:
    """Greedy NMS as the official detector runs it (reference ``hard_nms``): only the ``candidates``
    best boxes take part, the best remaining box is kept, boxes whose IoU with it (``+1e-5`` in the
    denominator) exceeds ``iou`` are dropped. Ties in score resolve as the reference's ascending
    ``np.argsort`` does. Returns indices into ``boxes``, best first."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    order = np.argsort(np.asarray(scores))[-candidates:]
    keep = []
    while len(order):
        best = order[-1]
        keep.append(int(best))
        order = order[:-1]
        if not len(order):
            break
        rest = boxes[order]
        inter = _area(np.c_[np.maximum(rest[:, :2], boxes[best, :2]), np.minimum(rest[:, 2:], boxes[best, 2:])])
        order = order[inter / (_area(rest) + _area(boxes[best]) - inter + 1e-5) <= iou]
    return keep


def _area(b: np.ndarray) -> np.ndarray:
    """Area of ``x1 y1 x2 y2`` boxes, 0 where a box is inverted (the reference's ``area_of``)."""
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


def detections_to_boxes(outs: list[np.ndarray], m: np.ndarray, width: int, height: int,
                        min_score: float = _DET_SCORE) -> tuple[np.ndarray, np.ndarray]:
    """The official detector's raw outputs (3 score maps, then 3 GFL distance maps) -> boxes
    ``[N, 4]`` (float, whole pixels, x1 y1 x2 y2) and scores ``[N]``, best first (reference
    ``NanoDetABC.postprocess``): decode, keep score > ``min_score``, :func:`hard_nms`, map the 4
    corners through the inverse of the 3×3 letterbox ``m``, clip to the image, truncate to int."""
    n = len(_DET_STRIDES)
    scores = [np.asarray(o).reshape(-1) for o in outs[:n]]
    boxes, probs = decode_gfl(scores, outs[n:])
    # the reference sorts each stride's cells by descending score (reversed np.argsort) before
    # concatenating; kept because it decides which of two equal scores NMS keeps
    start = np.cumsum([0] + [len(s) for s in scores])
    order = np.concatenate([a + np.argsort(s)[::-1] for a, s in zip(start, scores)])
    boxes, probs = boxes[order], probs[order]
    keep = probs > min_score
    boxes, probs = boxes[keep], probs[keep]
    idx = hard_nms(boxes, probs)
    boxes, probs = boxes[idx], probs[idx]
    # back to image pixels: the 4 corners through the inverse letterbox, clipped, float32, truncated
    corners = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(-1, 2)
    pts = (np.c_[corners, np.ones(len(corners))] @ np.linalg.inv(m).T)
    pts = (pts[:, :2] / pts[:, 2:]).reshape(-1, 4, 2)
    out = np.concatenate([pts.min(1), pts.max(1)], 1)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out.astype(np.float32).astype(np.int32).astype(np.float64).reshape(-1, 4), probs.astype(np.float64)


def box_crop_matrix(box) -> np.ndarray:
    """2×3 affine of the first landmark crop: the box's centre to the centre of the 128² crop, its
    longer side to 85 % of it, no rotation (reference ``get_warp_mat_bbox(bbox, 0, 128, 0.15)``)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    scale = _LM_SIZE / max(box[2] - box[0], box[3] - box[1]) * (1 - _LM_MARGIN)
    m = cv2.getRotationMatrix2D((float(cx), float(cy)), 0.0, float(scale))
    m[:, 2] += (_LM_SIZE / 2 - cx, _LM_SIZE / 2 - cy)
    return m


def points_crop_matrix(pts: np.ndarray, angle_deg: float) -> np.ndarray:
    """2×3 affine of a refinement crop (reference ``get_warp_mat_bbox_by_gt_pts_float``): rotate by
    ``angle_deg`` about the centre of the points' bounding box, scale the rotated points' longer
    extent to 85 % of 128 px and centre them."""
    lo, hi = pts.min(0), pts.max(0)
    c = (float((lo[0] + hi[0]) / 2), float((lo[1] + hi[1]) / 2))
    r = cv2.transform(pts[:, None], cv2.getRotationMatrix2D(c, angle_deg, 1.0))[:, 0]
    scale = _LM_SIZE / max(*(r.max(0) - r.min(0))) * (1 - _LM_MARGIN)
    m = cv2.getRotationMatrix2D(c, angle_deg, float(scale))
    r = cv2.transform(pts[:, None], m)[:, 0]
    m[:, 2] += _LM_SIZE / 2 - (r.min(0) + r.max(0)) / 2
    return m


class OfficialOnnxDetector:
    """The FantasyPortrait release's face detector (``face_det.onnx``, NanoDet-style GFL, BGR input
    letterboxed to 160×272) + 222-point landmark model (``face_landmark.onnx``, 128² crops).

    Per image: detection on the whole image with score > ``min_score`` (0.4), hard NMS at IoU 0.3 over the 200 best
    boxes, boxes mapped back and truncated to whole pixels (reference ``face_det.py``); per face three
    landmark passes, the first on the box, the next two on the previous pass's points, rotated by the
    eye-corner roll measured in the previous crop (reference ``FaceAlignment.forward``); the 5
    alignment points are landmarks 182/202/36/149/133 (pupils, nose tip, mouth corners, reference
    ``warp_face_pd_fgc``). Faces whose landmark probability is under 1e-4 are dropped (reference
    tracker ``face_prob_th``).

    Beyond the reference: the network sees a 160×272 letterbox, so in a landscape image faces
    shrink to a few pixels and are missed (a 1694×610 scene: 1 of 3 faces; a 1280×720 row of
    75 px faces: 1 of 6). With ``tiles`` (default) overlapping portrait tiles of the image are
    searched too, and a face found there is added when no whole-image box overlaps it; the faces the
    whole-image pass finds keep the reference's boxes exactly (docs/DETECTORS.md).

    Args:
        det_path, landmark_path: ``face_det.onnx`` and ``face_landmark.onnx``.
        min_score: detection score threshold (reference 0.4).
        threads: onnxruntime intra-op threads (None: onnxruntime's default).
        tiles: also search overlapping portrait tiles of a landscape image (:meth:`find_boxes`);
            False runs the reference's single pass only.
    Raises:
        BackendUnavailable: naming the pip command when onnxruntime is missing.
        FileNotFoundError: naming the missing file and where it goes.
        ValueError: a file onnxruntime cannot load (names it).
    """

    name = "official"

    def __init__(self, det_path: str, landmark_path: str, min_score: float = _DET_SCORE, threads: int | None = None,
                 tiles: bool = True):
        require_backend("official")
        for p in (det_path, landmark_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p} not found: put face_det.onnx and face_landmark.onnx from the "
                                        f"FantasyPortrait release (huggingface.co/acvlab/FantasyPortrait) in "
                                        f"ComfyUI/models/fantasyportrait")
        import onnxruntime as ort

        providers = _onnx_providers()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        sessions = []
        for p in (det_path, landmark_path):
            try:
                sessions.append(ort.InferenceSession(p, sess_options=opts, providers=providers))
            except Exception as e:  # onnxruntime raises its own (Fail, InvalidProtobuf, ...) types
                raise ValueError(f"{p} could not be loaded by onnxruntime ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); download it again from the "
                                 f"FantasyPortrait release") from e
        self.det, self.lm = sessions
        self._lm_outputs = [o.name for o in self.lm.get_outputs()]  # landmark, euler, prob
        self.min_score = min_score
        self.tiles = bool(tiles)

    def close(self):
        pass

    def detect_boxes(self, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Face boxes ``[N, 4]`` (float, whole pixels, x1 y1 x2 y2) and scores ``[N]`` of a BGR uint8
        image, best score first (reference ``FaceDet.detect``)."""
        h, w = bgr.shape[:2]
        m = np.vstack([letterbox_matrix(w, h), [0, 0, 1]])
        x = cv2.warpPerspective(bgr, m, _DET_SIZE).astype(np.float32) / 255
        x = ((x - _DET_MEAN / 255) / (_DET_STD / 255)).transpose(2, 0, 1)[None]
        outs = self.det.run(None, {self.det.get_inputs()[0].name: x})
        return detections_to_boxes(outs, m, w, h, self.min_score)

    def find_boxes(self, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`detect_boxes` on the whole image, plus, when ``tiles`` is on and the image is
        landscape (width > 1.34 × height), on overlapping tiles of the network's 160:272 aspect and
        the image's full height (:func:`_portrait_tiles`). A tile box touching an inner tile edge is
        a cut face and dropped; the others are added best first when their IoU with every kept box
        is <= 0.3 and less than half of them lies inside one. Whole-image boxes come first, unchanged."""
        boxes, probs = self.detect_boxes(bgr)
        h, w = bgr.shape[:2]
        if not self.tiles:
            return boxes, probs
        extra = []
        for x0, x1 in _portrait_tiles(w, h):
            tb, tp = self.detect_boxes(np.ascontiguousarray(bgr[:, x0:x1]))
            for b, p in zip(tb, tp):
                if (b[0] <= 1 and x0 > 0) or (b[2] >= x1 - x0 - 1 and x1 < w):
                    continue
                extra.append((b + [x0, 0, x0, 0], p))
        kept_b, kept_p = list(boxes), list(probs)
        for b, p in sorted(extra, key=lambda e: -e[1]):
            if kept_b:
                others = np.array(kept_b)
                if box_iou(b[None], others).max() > _DET_NMS_IOU or box_containment(b[None], others).max() > 0.5:
                    continue
            kept_b.append(b)
            kept_p.append(p)
        return np.array(kept_b, float).reshape(-1, 4), np.array(kept_p, float)

    def _landmark_pass(self, bgr: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, float, float, np.ndarray]:
        """One landmark run on the 128² crop ``m``: (222 points in image pixels float32, eye-corner
        roll in the crop in degrees, face probability, model euler output (pitch, yaw) in radians)."""
        crop = cv2.warpAffine(bgr, m, (_LM_SIZE, _LM_SIZE))
        x = crop.transpose(2, 0, 1).astype(np.float32)[None] / 255.0
        lm, euler, prob = self.lm.run(self._lm_outputs, {self.lm.get_inputs()[0].name: x})
        pts = lm[0].reshape(2, -1).T * _LM_SIZE
        a, b = pts[_LM_ROLL[0]], pts[_LM_ROLL[1]]
        roll = np.float32(np.arctan2(b[1] - a[1], b[0] - a[0] + 1e-8))  # float32 as the reference's euler array
        pts = cv2.transform(pts[:, None], cv2.invertAffineTransform(m))[:, 0]
        return pts, float(np.rad2deg(roll)), float(np.asarray(prob).reshape(-1)[0]), np.asarray(euler).reshape(-1)[:2]

    def landmarks222(self, bgr: np.ndarray, box: np.ndarray, passes: int = _LM_PASSES,
                     return_pose: bool = False):
        """222 landmarks (``[222, 2]`` float32 pixels) and face probability of the face in ``box``
        (reference ``FaceAlignment.forward(face_box=box, iterations=3)``). Each refinement crop is
        rotated by the roll measured in the previous crop, not in the image: after the upright second
        crop that residual is near 0, so the third crop is near unrotated, as in the reference.
        With ``return_pose`` also the head pose (pitch, yaw, roll) in degrees (see :class:`Face`)."""
        pts, roll, prob, euler = self._landmark_pass(bgr, box_crop_matrix(box))
        for _ in range(passes - 1):
            pts, roll, prob, euler = self._landmark_pass(bgr, points_crop_matrix(pts, roll))
        if not return_pose:
            return pts, prob
        a, b = pts[_LM_ROLL[0]], pts[_LM_ROLL[1]]
        pose = np.r_[np.rad2deg(euler.astype(np.float64)), np.degrees(np.arctan2(b[1] - a[1], b[0] - a[0]))]
        return pts, prob, pose

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in ``image`` (``[H, W, 3]`` uint8 RGB), left to right, with :attr:`Face.pose`."""
        bgr = np.ascontiguousarray(check_image(image)[..., ::-1])
        boxes, probs = self.find_boxes(bgr)
        faces = []
        for box, p in zip(boxes, probs):
            pts, prob, pose = self.landmarks222(bgr, box, return_pose=True)
            if prob < _LM_MIN_PROB:
                continue
            faces.append(Face(box=box, landmarks=order_points(pts[_LM_FIVE]), score=float(p), pose=pose))
        return sorted(faces, key=lambda f: f.center[0])


BACKENDS = ("auto", "mtcnn", "mediapipe", "insightface", "official")

# Each backend's own confidence threshold (used when none is given).
DEFAULT_MIN_SCORE = {"mtcnn": 0.9, "mediapipe": 0.5, "insightface": 0.5, "official": _DET_SCORE}

OFFICIAL_FILES = ("face_det.onnx", "face_landmark.onnx")


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

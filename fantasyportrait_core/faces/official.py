"""The ``official`` face detector backend: the FantasyPortrait release's ``face_det.onnx``
(NanoDet-style GFL detector) + ``face_landmark.onnx`` (222 points), run with onnxruntime, with the
reference's pre/post-processing (letterbox, GFL decoding, hard NMS, landmark crops).

Every step follows the FantasyPortrait release (Fantasy-AMAP/fantasy-portrait, commit 4df229c):
detector = diffsynth/models/face_det.py (NanoDetABC / FaceDet), landmarks = face_align.py
(FaceAlignment.forward) with the crops of face_utils.py. tests/reference_face.py is a literal port of
those files and tests/test_official_parity.py checks this code against it on the shared inputs.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from fantasyportrait_core.faces.face import Face, box_containment, box_iou, check_image, order_points
from fantasyportrait_core.faces.packages import onnx_providers, require_backend

OFFICIAL_FILES = ("face_det.onnx", "face_landmark.onnx")

_DET_SIZE = (160, 272)  # network input (w, h)
_DET_MEAN = np.array([103.53, 116.28, 123.675], np.float32)  # BGR, 0..255
_DET_STD = np.array([57.375, 57.12, 58.395], np.float32)
_DET_STRIDES = (8, 16, 32)
_DET_BINS = 8  # GFL reg_max 7 -> 8 bins per side
DET_SCORE, _DET_NMS_IOU, _DET_CANDIDATES = 0.4, 0.3, 200
_LM_SIZE, _LM_MARGIN, _LM_PASSES = 128, 0.15, 3
_LM_FIVE = [182, 202, 36, 149, 133]  # left pupil, right pupil, nose tip, left/right mouth corner
_LM_ROLL = (74, 96)  # outer corners of the image-left and image-right eyes
_LM_MIN_PROB = 1e-4  # the reference tracker's face_prob_th (camer.py)


def _portrait_tiles(w: int, h: int, max_aspect: float = 1.34) -> list[tuple[int, int]]:
    """Column ranges ``(x0, x1)`` of overlapping full-height tiles with the official detector's
    160:272 aspect, half a tile apart, covering a landscape image (``w > max_aspect · h``); none
    otherwise (the whole-image pass already sees such an image at a usable scale)."""
    if w <= max_aspect * h:
        return []
    side = max(1, int(round(h * _DET_SIZE[0] / _DET_SIZE[1])))
    n = int(np.ceil((w - side) / (side / 2))) + 1
    return [(int(x), int(x) + side) for x in np.linspace(0, w - side, n).astype(int)]


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
                        min_score: float = DET_SCORE) -> tuple[np.ndarray, np.ndarray]:
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

    def __init__(self, det_path: str, landmark_path: str, min_score: float = DET_SCORE, threads: int | None = None,
                 tiles: bool = True):
        require_backend("official")
        for p in (det_path, landmark_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p} not found: put face_det.onnx and face_landmark.onnx from the "
                                        f"FantasyPortrait release (huggingface.co/acvlab/FantasyPortrait) in "
                                        f"ComfyUI/models/fantasyportrait")
        import onnxruntime as ort

        providers = onnx_providers()
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

"""The ``mediapipe`` face detector backend (optional, offline): BlazeFace short- and full-range +
Face Mesh, models inside the mediapipe 0.10.21 wheel."""

from __future__ import annotations

import logging
import os

import numpy as np

from fantasyportrait_core.faces.face import Face, check_image, nms, order_points
from fantasyportrait_core.faces.packages import require_backend

log = logging.getLogger("FantasyPortrait")

# Face Mesh (478 points with iris refinement) indices: pupil centres (the reference's 222-point
# indices 182/202 are pupil centres too), nose tip, mouth corners.
_MESH_EYE_A = 468
_MESH_EYE_B = 473
_MESH_NOSE = 1
_MESH_MOUTH = (61, 291)


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

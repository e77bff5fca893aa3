"""The ``mtcnn`` face detector backend (offline; weights inside the facenet-pytorch wheel)."""

from __future__ import annotations

import numpy as np

from fantasyportrait_core.faces.face import Face, check_image, order_points
from fantasyportrait_core.faces.packages import require_backend


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

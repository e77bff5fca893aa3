"""The ``insightface`` face detector backend: ``buffalo_l`` / ``antelopev2`` (SCRFD detection,
5 keypoints, ArcFace identity embedding) from a local model folder."""

from __future__ import annotations

import os

import numpy as np

from fantasyportrait_core.faces.face import Face, check_image, order_points
from fantasyportrait_core.faces.packages import onnx_providers, require_backend


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

        providers = onnx_providers()
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

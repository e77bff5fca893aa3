"""What each face detector backend needs installed, and the one-line errors when it is missing or
broken (mediapipe, insightface and onnxruntime are optional: not in requirements.txt). Checked with
``importlib.util.find_spec``, without importing the packages."""

from __future__ import annotations

import importlib.util

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


def onnx_providers() -> list[str]:
    """onnxruntime execution providers to ask for: CUDA when this onnxruntime has it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


"""The few ComfyUI services the nodes use, each with a plain fallback so the nodes also run (and
are tested) without a ComfyUI install: model folders, device, progress bar, interrupt."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

log = logging.getLogger("FantasyPortrait")

MODEL_FOLDER = "fantasyportrait"  # ComfyUI/models/fantasyportrait: adapter, pd_fpg, ONNX face models
DOWNLOAD_HINT = ("FantasyPortrait files: https://huggingface.co/acvlab/FantasyPortrait "
                 "(fantasyportrait_model.ckpt, pd_fpg.pth, face_det.onnx, face_landmark.onnx) or the repacked "
                 "https://huggingface.co/Kijai/WanVideo_comfy (FantasyPortrait/Wan2_1_FantasyPortrait_fp16.safetensors)")

try:  # inside ComfyUI
    import folder_paths
except ImportError:  # plain Python (tests, scripts)
    folder_paths = None


def register_model_folder():
    """Register ``models/fantasyportrait`` (keeping any paths users configured in extra_model_paths)."""
    if folder_paths is None:
        return
    path = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    if MODEL_FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[MODEL_FOLDER]
        if path not in paths:
            paths.append(path)
        exts.update(folder_paths.supported_pt_extensions | {".onnx"})
    else:
        folder_paths.folder_names_and_paths[MODEL_FOLDER] = ([path], set(folder_paths.supported_pt_extensions) | {".onnx"})


GGUF_FOLDER = "diffusion_models_gguf"  # .gguf files in models/diffusion_models (+ unet), listed apart


def register_gguf_folder():
    """List ``.gguf`` transformers from the diffusion_models (and legacy unet) folders.

    ComfyUI's ``diffusion_models`` entry shares its extension set with every other folder, so .gguf
    gets its own entry over the same path list (the same list object: paths added later by
    extra_model_paths show up here too), as ComfyUI-GGUF does with ``unet_gguf``.
    """
    if folder_paths is None or GGUF_FOLDER in folder_paths.folder_names_and_paths:
        return
    paths = folder_paths.folder_names_and_paths.get("diffusion_models", ([], set()))[0]
    folder_paths.folder_names_and_paths[GGUF_FOLDER] = (paths, {".gguf"})


def transformer_list() -> list[str]:
    """Transformer files the model loader offers: safetensors/pickles and .gguf from diffusion_models."""
    return sorted(set(list_models("diffusion_models")) | set(list_models(GGUF_FOLDER)))


def transformer_path(name: str) -> str:
    """Full path of a transformer picked in the model loader (``.gguf`` included)."""
    return model_path(GGUF_FOLDER if name.lower().endswith(".gguf") else "diffusion_models", name)


def models_subdir(name: str) -> str:
    """``ComfyUI/models/<name>`` (first registered path for known folders), or ``models/<name>``
    outside ComfyUI."""
    if folder_paths is None:
        return os.path.join("models", name)
    if name in folder_paths.folder_names_and_paths:
        for p in folder_paths.get_folder_paths(name):
            if os.path.isdir(p):
                return p
    return os.path.join(folder_paths.models_dir, name)


def list_models(folder: str) -> list[str]:
    """File names in a ComfyUI model folder (empty list outside ComfyUI)."""
    if folder_paths is None:
        return []
    try:
        return folder_paths.get_filename_list(folder)
    except KeyError:
        return []


def model_path(folder: str, name: str) -> str:
    """Full path of ``name`` in ComfyUI model folder ``folder`` (or ``name`` itself if it is a path).

    Raises:
        FileNotFoundError: naming the folder, the file and where to download it.
    """
    if os.path.isabs(name) and os.path.isfile(name):
        return name
    full = folder_paths.get_full_path(folder, name) if folder_paths is not None else None
    if full is None or not os.path.isfile(full):
        where = (folder_paths.get_folder_paths(folder) if folder_paths is not None and folder in
                 folder_paths.folder_names_and_paths else [f"models/{folder}"])
        raise FileNotFoundError(f"'{name}' not found in ComfyUI model folder '{folder}' ({', '.join(where)}). "
                                f"Put the file there and refresh. {DOWNLOAD_HINT}")
    return full


def torch_device() -> torch.device:
    try:
        import comfy.model_management as mm

        return mm.get_torch_device()
    except ImportError:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device() -> torch.device:
    try:
        import comfy.model_management as mm

        return mm.unet_offload_device()
    except ImportError:
        return torch.device("cpu")


def available_ram_bytes() -> int | None:
    """Host RAM available now (psutil, which ComfyUI ships; else sysconf), or None if unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers: what moving it to a device or pinning it costs."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def free_vram_for(model: torch.nn.Module, device: torch.device):
    """Ask ComfyUI to unload its own models so ``model`` fits on ``device``."""
    if device.type != "cuda":
        return
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    need = weight_bytes(model) * 1.3
    mm.free_memory(need, device)
    mm.soft_empty_cache()


def check_interrupt():
    """Raise ComfyUI's interrupt exception if the user pressed Cancel (no-op outside ComfyUI)."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


class Progress:
    """``comfy.utils.ProgressBar`` with a latent preview; silently inactive outside ComfyUI."""

    def __init__(self, total: int):
        try:
            import comfy.utils

            self.bar = comfy.utils.ProgressBar(total)
        except ImportError:
            self.bar = None
        self.total = total

    def update(self, step: int, preview_latent: torch.Tensor | None = None):
        if self.bar is None:
            return
        preview = None
        if preview_latent is not None:
            preview = ("JPEG", latent_preview_image(preview_latent), 512)
        self.bar.update_absolute(step, self.total, preview)


def latent_preview_image(latent: torch.Tensor):
    """Cheap RGB preview of the middle latent frame of ``[1, 16, F, h, w]`` (Wan21 latent→RGB factors
    from ComfyUI when available, else the first 3 channels)."""
    from PIL import Image

    frame = latent[0, :, latent.shape[2] // 2].float().cpu()  # [16, h, w]
    try:
        from comfy.latent_formats import Wan21

        fmt = Wan21()
        factors = torch.tensor(fmt.latent_rgb_factors, dtype=torch.float32)  # [16, 3]
        bias = torch.tensor(fmt.latent_rgb_factors_bias or [0.0, 0.0, 0.0], dtype=torch.float32)
        rgb = torch.einsum("chw,cr->hwr", frame, factors) + bias
    except (ImportError, AttributeError):
        rgb = frame[:3].permute(1, 2, 0)
    rgb = ((rgb.clamp(-1, 1) + 1) * 127.5).byte().numpy()
    return Image.fromarray(np.ascontiguousarray(rgb))


def image_to_uint8(image: torch.Tensor) -> np.ndarray:
    """ComfyUI IMAGE ``[B, H, W, C]`` float 0..1 -> uint8 ``[B, H, W, 3]`` RGB.

    Raises:
        ValueError: naming the expected layout when the tensor is not an IMAGE.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (3, 4):
        raise ValueError(f"expected an IMAGE tensor [frames, height, width, 3], got "
                         f"{getattr(image, 'shape', type(image))}")
    return (image[..., :3].clamp(0, 1) * 255).round().byte().cpu().numpy()


def uint8_to_image(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` (or ``[H, W, 3]``) -> ComfyUI IMAGE float 0..1."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    return torch.from_numpy(np.ascontiguousarray(frames)).float() / 255.0

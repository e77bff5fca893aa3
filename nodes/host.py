"""The few ComfyUI services the nodes use, each with a plain fallback so the nodes also run (and
are tested) without a ComfyUI install: model folders, device, progress bar, interrupt."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os

import numpy as np
import torch

from fantasyportrait_core.validate import MIN_IMAGE_SIDE, InputError
from fantasyportrait_core.runtime.residency import available_ram_bytes  # noqa: F401  (one implementation; patched in tests)

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
    """Full path of ``name`` in ComfyUI model folder ``folder``.

    Inside ComfyUI only files inside that folder's registered paths are taken: absolute paths and
    ``..`` are refused, so a shared workflow cannot make a loader read an arbitrary file. Outside
    ComfyUI (tests, scripts) ``name`` may be a path.

    Raises:
        InputError: a name that leaves the model folder.
        FileNotFoundError: naming the folder, the file and where to download it.
    """
    if folder_paths is None:
        if os.path.isfile(name):
            return name
        full = None
    else:
        parts = name.replace("\\", "/").split("/")
        if os.path.isabs(name) or ".." in parts or (len(name) > 1 and name[1] == ":"):
            raise InputError(f"'{name}': model files must be chosen from ComfyUI's '{folder}' folder, not given as a "
                             f"path; put the file in {', '.join(_folder_list(folder))} and pick it from the list")
        full = folder_paths.get_full_path(folder, name)
        if full is not None and not _inside(full, _folder_list(folder)):
            raise InputError(f"'{name}' resolves outside ComfyUI's '{folder}' folders; pick a file from the list")
    if full is None or not os.path.isfile(full):
        raise FileNotFoundError(f"'{name}' not found in ComfyUI model folder '{folder}' ({', '.join(_folder_list(folder))}). "
                                f"Put the file there and refresh. {DOWNLOAD_HINT}")
    return full


def _folder_list(folder: str) -> list[str]:
    if folder_paths is not None and folder in folder_paths.folder_names_and_paths:
        return list(folder_paths.get_folder_paths(folder))
    return [f"models/{folder}"]


def _inside(path: str, folders: list[str]) -> bool:
    """Whether ``path`` lies inside one of ``folders`` (symlinked files inside a folder count as inside:
    users link large models from other disks)."""
    where = os.path.abspath(path)
    for f in folders:
        root = os.path.abspath(f)
        if os.path.commonpath([where, root]) == root:
            return True
    return False


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


IMAGE_RANGE_SLACK = 0.05  # IMAGE values this far outside 0..1 (resampling overshoot) are clamped; more is an error


def image_to_uint8(image: torch.Tensor, name: str = "image", min_side: int = MIN_IMAGE_SIDE) -> np.ndarray:
    """ComfyUI IMAGE ``[B, H, W, C]`` float 0..1 -> uint8 ``[B, H, W, 3]`` RGB, checked.

    Grayscale (C = 1) is expanded to RGB and alpha (C = 4) dropped; a single ``[H, W, C]`` image
    is taken as a batch of one. Values a little outside 0..1 are clamped.

    Raises:
        InputError: naming ``name`` for a non-IMAGE, an empty batch, NaN/Inf, values far outside
            0..1 (e.g. 0..255 or -1..1 data), or frames under ``min_side`` pixels.
    """
    if not isinstance(image, torch.Tensor):
        raise InputError(f"{name} must be an IMAGE tensor [frames, height, width, 3], got {type(image).__name__}")
    if image.ndim == 3 and image.shape[-1] in (1, 3, 4):
        image = image[None]
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise InputError(f"{name} must be an IMAGE [frames, height, width, 3], got shape {tuple(image.shape)}")
    b, h, w, _ = image.shape
    if b == 0:
        raise InputError(f"{name} is an empty batch (0 frames); connect a node that outputs at least one image")
    if min(h, w) < min_side:
        raise InputError(f"{name} is {w}x{h}; a face cannot be found in images under {min_side} px on a side: "
                         f"use a larger image")
    check_finite(image, name, "check the node that made it (a failed decode or a bad upscale)")
    lo, hi = float(image.min()), float(image.max())
    if lo < -IMAGE_RANGE_SLACK or hi > 1 + IMAGE_RANGE_SLACK:
        raise InputError(f"{name} values span {lo:.3g}..{hi:.3g} but an IMAGE holds 0..1 (this looks like "
                         f"{'0..255' if hi > 2 else '-1..1'} data); convert it before connecting")
    if image.shape[-1] == 1:
        image = image.expand(-1, -1, -1, 3)
    return (image[..., :3].clamp(0, 1) * 255).round().byte().cpu().numpy()


def check_finite(t: torch.Tensor, name: str, fix: str = "") -> torch.Tensor:
    """Raise InputError naming ``name`` when ``t`` holds NaN or infinity (counts them)."""
    if t.is_floating_point() or t.is_complex():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            n = int(bad.sum())
            raise InputError(f"{name} holds {n} NaN/infinite value(s) of {t.numel()}" + (f"; {fix}" if fix else ""))
    return t


def masks_to_tensor(mask: torch.Tensor, name: str = "masks") -> torch.Tensor:
    """A ComfyUI MASK as float ``[N, H, W]`` in 0..1.

    Accepts ``[H, W]`` (one mask), ``[N, H, W]`` and ``[N, 1, H, W]``.

    Raises:
        InputError: other shapes, an empty batch, NaN/Inf or values outside 0..1.
    """
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"{name} must be a MASK tensor [N, H, W], got {type(mask).__name__}")
    m = mask
    if m.ndim == 2:
        m = m[None]
    elif m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3:
        raise InputError(f"{name} must be a MASK [N, H, W], [N, 1, H, W] or [H, W], got shape {tuple(mask.shape)}")
    if m.shape[0] == 0 or m.shape[1] == 0 or m.shape[2] == 0:
        raise InputError(f"{name} is empty (shape {tuple(mask.shape)}); connect one mask per character")
    m = check_finite(m.float(), name, "redraw or regenerate the mask")
    lo, hi = float(m.min()), float(m.max())
    if lo < -IMAGE_RANGE_SLACK or hi > 1 + IMAGE_RANGE_SLACK:
        raise InputError(f"{name} values span {lo:.3g}..{hi:.3g} but a MASK holds 0..1; convert it before connecting")
    return m.clamp(0, 1)


def check_latent(latent, name: str = "latent") -> torch.Tensor:
    """The ``samples`` of a Wan2.1 video LATENT ``[1, 16, T, H/8, W/8]``, checked.

    Raises:
        InputError: not a LATENT dict, wrong shape, zero length, batch > 1, or NaN/Inf.
    """
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise InputError(f"{name} must be a LATENT (e.g. from WanImageToVideo)")
    if samples.ndim != 5 or samples.shape[1] != 16:
        raise InputError(f"{name} must be a Wan2.1 video latent [1, 16, frames, H/8, W/8], got {tuple(samples.shape)}; "
                         "connect WanImageToVideo's latent")
    b, _, t, h, w = samples.shape
    if t == 0 or h == 0 or w == 0:
        raise InputError(f"{name} has {t} latent frames of {w * 8}x{h * 8} pixels; set WanImageToVideo length to at "
                         "least 1 and a real size")
    if b != 1:
        raise InputError(f"{name} has batch size {b}; FantasyPortrait generates one video at a time: set "
                         "WanImageToVideo batch_size to 1")
    return check_finite(samples, name, "the node that made it produced NaN; check its inputs")


@contextlib.contextmanager
def progress(desc: str, total: int | None):
    """A ComfyUI progress bar as a ``progress(desc, total)`` context yielding ``update(n)`` (the
    form :func:`fantasyportrait_core.drive.encode.encode_driving` takes); inactive outside ComfyUI."""
    bar = Progress(max(int(total or 1), 1))
    done = [0]

    def update(n: int):
        done[0] += n
        bar.update(min(done[0], bar.total))

    yield update


def uint8_to_image(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` (or ``[H, W, 3]``) -> ComfyUI IMAGE float 0..1."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    return torch.from_numpy(np.ascontiguousarray(frames)).float() / 255.0


def queue_validator(classic: type):
    """The V3 ``validate_inputs`` of a plain node class: checks every dropdown (combo) value against
    the node's current choices (ComfyUI 0.3.x does not check V3 combos when a prompt is queued, so a
    shared workflow naming a model file the user lacks would run until its loader), then calls the
    class's own ``VALIDATE_INPUTS``.

    ComfyUI passes a validator only the inputs its signature names (and skips its own min/max check
    for those), so the function carries an explicit ``__signature__`` of exactly the combo inputs
    and the inputs ``VALIDATE_INPUTS`` takes. Returns ``None`` when there is nothing to check.
    """
    spec = classic.INPUT_TYPES()
    combos = [n for group in ("required", "optional") for n, e in spec.get(group, {}).items() if isinstance(e[0], list)]
    own = getattr(classic, "VALIDATE_INPUTS", None)
    own_names = [p for p in inspect.signature(own).parameters] if own is not None else []
    names = list(dict.fromkeys(combos + own_names))
    if not names:
        return None

    def validate_inputs(cls, **inputs):
        current = classic.INPUT_TYPES()
        for group in ("required", "optional"):
            for name, entry in current.get(group, {}).items():
                value = inputs.get(name)
                if name in combos and value is not None and isinstance(entry[0], list) and value not in entry[0]:
                    shown = ", ".join(map(str, entry[0][:6])) + (" ..." if len(entry[0]) > 6 else "")
                    return (f"{name}: '{value}' is not one of the {len(entry[0])} choices ({shown or 'none'}); pick "
                            f"one from the list (a model file must be in its ComfyUI models folder: refresh after "
                            f"adding it)")
        if own is not None:
            return own(**{k: inputs.get(k) for k in own_names})
        return True

    params = [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for n in names]
    validate_inputs.__signature__ = inspect.Signature(params)
    return validate_inputs

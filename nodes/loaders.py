"""Loader nodes: transformer + portrait adapter, expression encoder, face detector."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fantasyportrait_core.attention import PortraitState, attach_portrait_processors
from fantasyportrait_core.checkpoints import load_adapter, load_expression_encoder, load_transformer
from fantasyportrait_core.detectors import make_detector, missing_packages
from fantasyportrait_core.models import DTYPES

from . import host

CATEGORY = "FantasyPortrait/loaders"


@dataclass
class PortraitModel:
    """FANTASYPORTRAIT_MODEL: the Wan2.1-I2V transformer with the portrait adapter attached.

    ``offload == "block"`` means diffusers group offload streams blocks to the GPU, so the sampler
    must not move the whole transformer. ``loras``: ``(LoraWeights, strength)`` pairs added by
    FantasyPortrait LoRA nodes; the sampler makes exactly these active (the transformer is shared
    with the loader's output, so the LoRA node itself changes no weights).
    """

    transformer: torch.nn.Module
    adapter: torch.nn.Module
    state: PortraitState
    dtype: torch.dtype
    offload: str = "none"
    loras: tuple = ()


def pin_weights_upfront(weights_bytes: int, available_bytes: int | None) -> bool:
    """Whether block offload may keep a pinned (page-locked) host copy of all weights.

    Pinned copies make the block-by-block uploads overlap with compute, but they are a second copy
    of the weights (15.5 GiB for the 14B in fp8, 30.5 GiB in bf16) that cannot be swapped out; the
    cards that need offload often sit in machines with 32 GB of RAM. So pin up front only when the
    weights take under half of the RAM available now, else pin each block on the fly (diffusers
    ``low_cpu_mem_usage``).
    """
    return available_bytes is not None and 2 * weights_bytes < available_bytes


def build_portrait_model(transformer, adapter, dtype, offload: str = "none") -> PortraitModel:
    state = attach_portrait_processors(transformer, adapter)
    if offload == "block":
        device = host.torch_device()
        if device.type == "cuda":
            upfront = pin_weights_upfront(host.weight_bytes(transformer), host.available_ram_bytes())
            transformer.enable_group_offload(device, offload_device=torch.device("cpu"), offload_type="block_level",
                                             num_blocks_per_group=1, use_stream=True, low_cpu_mem_usage=not upfront)
            adapter.to(device)
    return PortraitModel(transformer, adapter, state, dtype, offload)


class FantasyPortraitModelLoader:
    """Wan2.1-I2V-14B transformer (any published format) + FantasyPortrait adapter."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "transformer": (host.transformer_list(), {
                "tooltip": "Wan2.1-I2V-14B (480P or 720P) transformer from models/diffusion_models: original Wan "
                           "keys, the Comfy-Org repack, fp8 / fp8-scaled files, a sharded release (pick any "
                           "one shard, e.g. diffusion_pytorch_model-00001-of-00007: all shards are loaded), or a "
                           "GGUF quantisation (city96 Q4_K_M … Q8_0; keep storage = same)."}),
            "adapter": (host.list_models(host.MODEL_FOLDER), {
                "tooltip": "fantasyportrait_model.ckpt or Wan2_1_FantasyPortrait_fp16.safetensors from "
                           "models/fantasyportrait."}),
            "weight_dtype": (list(DTYPES), {"default": "bf16", "tooltip": "Compute dtype of the weights."}),
            "storage": (["same", "fp8_e4m3fn"], {
                "default": "same",
                "tooltip": "fp8_e4m3fn stores the transformer blocks' linear weights as scaled fp8 (about 16 GB "
                           "for 14B; fp8-scaled files keep their own scales) and computes in weight_dtype."}),
            "offload": (["none", "block"], {
                "default": "none",
                "tooltip": "block: keep weights in CPU RAM and stream one block at a time to the GPU "
                           "(for 24 GB cards; slower)."}),
        }}

    RETURN_TYPES = ("FANTASYPORTRAIT_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The transformer with the portrait adapter attached: connect FantasyPortrait Sampler's model.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads the Wan2.1 image-to-video transformer and attaches the FantasyPortrait adapter."

    def load(self, transformer, adapter, weight_dtype="bf16", storage="same", offload="none"):
        dtype = DTYPES[weight_dtype]
        storage_dtype = torch.float8_e4m3fn if storage == "fp8_e4m3fn" else None
        model = load_transformer(host.transformer_path(transformer), dtype=dtype,
                                 device=host.offload_device(), storage_dtype=storage_dtype)
        portrait = load_adapter(host.model_path(host.MODEL_FOLDER, adapter), dtype=dtype, device=host.offload_device())
        return (build_portrait_model(model, portrait, dtype, offload),)


class FantasyPortraitExpressionEncoderLoader:
    """PD-FGC expression encoder (``pd_fpg.pth`` or the ``pd_fpg.*`` part of the repacked adapter)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "encoder": (host.list_models(host.MODEL_FOLDER), {
                "tooltip": "pd_fpg.pth, or the repacked Wan2_1_FantasyPortrait_fp16.safetensors (it contains "
                           "the encoder under pd_fpg.*), from models/fantasyportrait."}),
        }}

    RETURN_TYPES = ("FP_EXPRESSION_ENCODER",)
    RETURN_NAMES = ("expression_encoder",)
    OUTPUT_TOOLTIPS = ("The expression encoder: connect every Encode Expression.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads the PD-FGC implicit expression encoder (headpose, eyes, emotion, mouth per frame)."

    def load(self, encoder):
        return (load_expression_encoder(host.model_path(host.MODEL_FOLDER, encoder)),)


# Option strings are stored in workflows: never rename one.
DETECTORS = {
    "auto": ("auto", None),
    "mtcnn (offline)": ("mtcnn", None),
    "mediapipe (offline)": ("mediapipe", None),
    "insightface buffalo_l": ("insightface", "buffalo_l"),
    "insightface antelopev2": ("insightface", "antelopev2"),
    "official onnx": ("official", None),
}


def _installed_note() -> str:
    """Which optional backends this ComfyUI can run, for the tooltip (checked without importing)."""
    missing = {kind: missing_packages(kind) for kind in ("mediapipe", "insightface", "official")}
    ok = [k for k, m in missing.items() if not m]
    no = [f"{k} (needs {' + '.join(m)})" for k, m in missing.items() if m]
    note = f" Installed here: mtcnn{''.join(', ' + k for k in ok)}."
    return note + (f" Not installed: {', '.join(no)}." if no else "")


class FantasyPortraitFaceDetectorLoader:
    """Face detector returning boxes, 5 landmarks and (insightface) identity embeddings."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "backend": (list(DETECTORS), {
                "default": "auto",
                "tooltip": "auto: the official face_det.onnx + face_landmark.onnx when both are in "
                           "models/fantasyportrait and onnxruntime is installed, else mtcnn. "
                           "mtcnn: weights shipped inside the facenet-pytorch wheel, nothing to download. "
                           "mediapipe: needs mediapipe==0.10.21 (numpy<2, Python<=3.12). "
                           "insightface: models/insightface/models/<name>/*.onnx; gives identity embeddings "
                           "(needed for identity assignment). official onnx: the FantasyPortrait release's "
                           "face models (the landmarks the model was trained with). The backend that ran is "
                           "written on the Face Masks preview and in Encode Expression's info."
                           + _installed_note()}),
            "min_score": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.05,
                                    "tooltip": "Detection confidence threshold; 0 = the backend's own default "
                                               "(mtcnn 0.9, mediapipe 0.5, insightface 0.5, official onnx 0.4)."}),
        }}

    RETURN_TYPES = ("FP_FACE_DETECTOR",)
    RETURN_NAMES = ("face_detector",)
    OUTPUT_TOOLTIPS = ("The face detector: connect Face Masks and every Encode Expression.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a face detector giving boxes and 5 landmarks (eyes, nose, mouth corners) per face, "
                   "used on the reference portrait and on every driving frame. A backend whose package is missing fails "
                   "with the pip command to run; see docs/INSTALL.md.")

    def load(self, backend="auto", min_score=0.0):
        if backend not in DETECTORS:
            raise ValueError(f"backend: unknown face detector {backend!r}; choose one of {list(DETECTORS)}")
        kind, name = DETECTORS[backend]
        if kind == "insightface":
            return (make_detector(kind, host.models_subdir("insightface"), min_score=min_score, name=name),)
        if kind in ("official", "auto"):
            return (make_detector(kind, host.models_subdir(host.MODEL_FOLDER), min_score=min_score),)
        return (make_detector(kind, min_score=min_score),)

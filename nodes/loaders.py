"""Loader nodes: transformer + portrait adapter, expression encoder, face detector."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from fantasyportrait_core.model.attention import PortraitState, attach_portrait_processors
from fantasyportrait_core.model.backends import ATTENTION_BACKENDS
from fantasyportrait_core.weights.experts import load_wan22_experts
from fantasyportrait_core.weights.load import load_adapter_for, load_expression_encoder, load_transformer
from fantasyportrait_core.faces.detect import make_detector
from fantasyportrait_core.faces.packages import missing_packages
from fantasyportrait_core.model.fp8 import FP8, quantize_model_fp8
from fantasyportrait_core.runtime.assemble import set_speed_options
from fantasyportrait_core.runtime.memory import choose_storage, measured_size
from fantasyportrait_core.model.build import DTYPES
from fantasyportrait_core.runtime import residency
from fantasyportrait_core.runtime.residency import WeightHome

from . import host
from .residency import ComfyResident, vram_available

log = logging.getLogger("FantasyPortrait")

CATEGORY = "FantasyPortrait/loaders"


@dataclass
class PortraitModel:
    """FANTASYPORTRAIT_MODEL: the Wan2.1-I2V transformer with the portrait adapter attached.

    Attributes:
        offload: ``"none"`` (resident on the GPU while sampling), ``"block"`` (diffusers group
            offload streams blocks to the GPU; the sampler must not move the whole transformer) or
            ``"auto"`` (the sampler's memory plan decides per prompt; once block offload is switched
            on it stays on for this model).
        storage: ``"bf16"`` (weights in the compute dtype) or ``"fp8"`` (scaled fp8 block linears).
        fp8_compute: how the fp8 linears multiply (``"upcast"`` or ``"scaled_mm"``: fast mode).
        compiled: the blocks were compiled with ``torch.compile``.
        home: where the weights live between prompts (no RAM copies when moving them).
        resident: the model as ComfyUI's memory management sees it (kept on the GPU between prompts).
        info: what the loader chose and why (shown by the sampler's info output).
        low_noise: Wan2.2-I2V-A14B only (experimental): the low-noise expert as its own PortraitModel
            (same adapter); ``transformer`` is then the high-noise expert. ``None`` for Wan2.1.
        loras: ``(LoraWeights, strength)`` pairs added by FantasyPortrait LoRA nodes; the sampler
            makes exactly these active (the transformer is shared with the loader's output, so the
            LoRA node itself changes no weights).
    """

    transformer: torch.nn.Module
    adapter: torch.nn.Module
    state: PortraitState
    dtype: torch.dtype
    offload: str = "none"
    loras: tuple = ()
    storage: str = "bf16"
    fp8_compute: str = "upcast"
    compiled: bool = False
    home: WeightHome | None = field(default=None, repr=False)
    resident: ComfyResident | None = field(default=None, repr=False)
    info: str = ""
    low_noise: "PortraitModel | None" = field(default=None, repr=False)

    def __post_init__(self):
        if self.home is None:
            self.home = WeightHome(self.transformer, self.adapter)
        if self.resident is None:
            self.resident = ComfyResident(self.transformer, self.adapter, self.home, host.torch_device(),
                                          host.offload_device(), self.dtype)

    @property
    def offload_active(self) -> bool:
        """Block offload hooks are on the transformer (state shared by every copy of this model,
        e.g. the ones LoRA nodes make with ``dataclasses.replace``)."""
        return self.resident.offload_active


def enable_block_offload(model: PortraitModel) -> None:
    """Stream the transformer's blocks to the GPU one at a time (diffusers group offload, next block
    copied on a side CUDA stream while the current one computes), each with its adapter K/V.
    No-op off CUDA."""
    device = host.torch_device()
    if device.type != "cuda" or model.offload_active:
        return
    if model.resident is not None:
        model.resident.detach()
    residency.enable_block_offload(model.transformer, device, host.available_ram_bytes(), adapter=model.adapter)
    model.resident.offload_active = True


FAST_MODES = ("off", "fp8 matmul", "fp8 matmul + compile")


def build_portrait_model(transformer, adapter, dtype, offload: str = "none", fast_mode: str = "off",
                         attention: str = "sdpa") -> PortraitModel:
    """Attach the adapter and set up speed and memory options.

    Args:
        offload: ``"none"``, ``"block"`` or ``"auto"`` (see :class:`PortraitModel`).
        fast_mode: one of :data:`FAST_MODES`: fp8 matmuls (``torch._scaled_mm``) on GPUs with fp8
            tensor cores (compute capability 8.9+; others keep fp8 storage with bf16 matmuls), and
            optionally ``torch.compile`` of the transformer blocks (diffusers regional compilation).
        attention: a key of :data:`~fantasyportrait_core.model.backends.ATTENTION_BACKENDS`.
    Raises:
        ValueError: unknown options. Fast mode on bf16 weights stores them as scaled fp8 first
            (the Model Loader refuses that combination with storage = same before loading).
    """
    if offload not in ("none", "block", "auto"):
        raise ValueError(f"offload {offload!r} is unknown; choose none, block or auto")
    if fast_mode not in FAST_MODES:
        raise ValueError(f"fast_mode {fast_mode!r} is unknown; choose one of {FAST_MODES}")
    state = attach_portrait_processors(transformer, adapter)
    speed = set_speed_options(transformer, host.torch_device(), attention, fast=fast_mode != "off",
                              compile=fast_mode.endswith("compile"))
    model = PortraitModel(transformer, adapter, state, dtype, offload=offload, storage=speed.storage,
                          fp8_compute=speed.fp8_compute, compiled=speed.compiled)
    notes = speed.notes
    if offload == "block":
        enable_block_offload(model)
    model.info = "model: " + ", ".join(notes)
    log.info("[FantasyPortrait] %s", model.info)
    return model


def stored_as_fp8(path: str) -> bool:
    """Whether a transformer file keeps its block weights in fp8 (fp8 or fp8-scaled releases)."""
    from fantasyportrait_core.weights.files import TensorSource
    from fantasyportrait_core.weights.keys import detect_transformer_format

    try:
        source = TensorSource(path)
        _, prefix, scaled = detect_transformer_format(source.keys())
    except Exception:
        return False
    if scaled:
        return True
    probe = next((k for k in source.keys() if k.endswith(("ffn.0.weight", "ffn.net.0.proj.weight"))), None)
    return probe is not None and source.get(probe).dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


class FantasyPortraitModelLoader:
    """Wan2.1-I2V-14B transformer (any published format) + FantasyPortrait adapter."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "transformer": (host.transformer_list(), {
                "tooltip": "Wan2.1-I2V-14B (480P or 720P) transformer from models/diffusion_models: original Wan "
                           "keys, the Comfy-Org repack, fp8 / fp8-scaled files, a sharded release (pick any "
                           "one shard, e.g. diffusion_pytorch_model-00001-of-00007: all shards are loaded), or a "
                           "GGUF quantisation (city96 Q4_K_M … Q8_0; keep storage = same). FlashPortrait: its "
                           "transformer.pt (a whole fine-tuned DiT, detected from its emo_k_proj keys) or our "
                           "single-file repack."}),
            "adapter": (host.list_models(host.MODEL_FOLDER), {
                "tooltip": "fantasyportrait_model.ckpt or Wan2_1_FantasyPortrait_fp16.safetensors from "
                           "models/fantasyportrait; with a FlashPortrait transformer: FlashPortrait's "
                           "portrait_encoder.pt (or the single-file repack)."}),
            "weight_dtype": (list(DTYPES), {"default": "bf16", "tooltip": "Compute dtype of the weights."}),
            "storage": (["same", "fp8_e4m3fn", "auto"], {
                "default": "auto",
                "tooltip": "fp8_e4m3fn stores the transformer blocks' linear weights as scaled fp8 (about 16 GB "
                           "for 14B; fp8-scaled files keep their own scales) and computes in weight_dtype. auto: "
                           "bf16 when it fits the free VRAM with 720p x 81 frames, else fp8 (fp8 files stay fp8)."}),
            "offload": (["none", "block", "auto"], {
                "default": "auto",
                "tooltip": "block: keep weights in CPU RAM and stream one block at a time to the GPU "
                           "(for 24 GB cards; slower). auto: the sampler decides per prompt from the free VRAM, "
                           "the size and length (its info output shows the plan)."}),
        }, "optional": {
            "fast_mode": (list(FAST_MODES), {
                "default": "off",
                "tooltip": "fp8 matmul: the blocks multiply in fp8 (torch._scaled_mm) on GPUs with fp8 tensor cores "
                           "(RTX 40xx/50xx, Ada, Hopper: compute capability 8.9+); needs fp8 storage (auto or "
                           "fp8_e4m3fn); ~2-3 % relative error per layer. + compile: also torch.compile the blocks "
                           "(needs Triton; the first prompt compiles for a minute or more)."}),
            "attention": (list(ATTENTION_BACKENDS), {
                "default": "sdpa",
                "tooltip": "sdpa: PyTorch picks its fastest kernel (cuDNN on H100/H200, flash elsewhere). "
                           "sdpa_cudnn / sdpa_flash force one. sageattention needs SageAttention 2.1.1+ (diffusers does not "
                           "use the registry's 1.0.6)."}),
            "transformer_2": (["none", *host.transformer_list()], {
                "default": "none",
                "tooltip": "EXPERIMENTAL, Wan2.2-I2V-A14B: the low-noise expert (e.g. wan2.2_i2v_low_noise_14B_fp8_scaled); "
                           "transformer is then the high-noise expert. The FantasyPortrait adapter was trained on "
                           "Wan2.1: its quality on Wan2.2 has not been measured. none: Wan2.1 (one transformer)."}),
        }}

    RETURN_TYPES = ("FANTASYPORTRAIT_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The transformer with the portrait adapter attached: connect FantasyPortrait Sampler's model.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads the Wan2.1 image-to-video transformer and attaches the FantasyPortrait adapter."

    def load(self, transformer, adapter, weight_dtype="bf16", storage="auto", offload="auto", fast_mode="off",
             attention="sdpa", transformer_2="none"):
        dtype = DTYPES[weight_dtype]
        path = host.transformer_path(transformer)
        if fast_mode != "off" and storage == "same" and not stored_as_fp8(path):
            raise ValueError("fast_mode multiplies in fp8 and needs fp8 weights: set storage to auto or fp8_e4m3fn")
        fp8 = storage == "fp8_e4m3fn" or (storage == "auto" and (fast_mode != "off" or stored_as_fp8(path)))
        experts = transformer_2 not in (None, "", "none")
        if experts:  # Wan2.2-I2V-A14B: both experts, strictly (one line for a single expert or a Wan2.1 file)
            model, low = load_wan22_experts(path, host.transformer_path(transformer_2), dtype=dtype,
                                            device=host.offload_device(), storage_dtype=FP8 if fp8 else None)
        else:
            model = load_transformer(path, dtype=dtype, device=host.offload_device(), storage_dtype=FP8 if fp8 else None)
        # FlashPortrait: transformer.pt (emo_k_proj) + portrait_encoder.pt, K/V into the adapter (load_adapter_for)
        portrait = load_adapter_for(model, host.model_path(host.MODEL_FOLDER, adapter), dtype=dtype,
                                    device=host.offload_device(), transformer_name=transformer, adapter_name=adapter)
        why = ""
        if storage == "auto" and not fp8:  # one expert at a time on the device: sized for one
            plan = choose_storage(measured_size(model, portrait), vram_available(host.torch_device()))
            why = f" (auto: {plan.describe()})"
            if plan.storage == "fp8":
                quantize_model_fp8(model)
                if experts:
                    quantize_model_fp8(low)
        built = build_portrait_model(model, portrait, dtype, offload, fast_mode, attention)
        built.info += why
        if experts:
            built.low_noise = build_portrait_model(low, portrait, dtype, offload, fast_mode, attention)
            built.info += ("\nWan2.2-I2V-A14B high- and low-noise experts (EXPERIMENTAL: the adapter was trained on "
                           "Wan2.1; quality on Wan2.2 not measured); one expert on the GPU at a time")
        return (built,)


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

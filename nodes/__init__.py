"""ComfyUI nodes of the FantasyPortrait pack: thin wrappers that convert ComfyUI types and call
``fantasyportrait_core``.

Node ids and display names are this pack's own: none equals one that ComfyUI-WanVideoWrapper,
ComfyUI-KJNodes, ComfyUI-VideoHelperSuite or ComfyUI-GGUF registers (``tests/test_comfy_contract.py``
checks them against those packs' sources); ids renamed for that, and how old graphs keep loading:
``nodes/ids.py``."""

from . import host
from .ids import NODE_ID_RENAMES
from .evaluate import FantasyPortraitEvaluate
from .loaders import (FantasyPortraitExpressionEncoderLoader, FantasyPortraitFaceDetectorLoader,
                      FantasyPortraitModelLoader)
from .native import FantasyPortraitAdapterLoader, FantasyPortraitGuider, FantasyPortraitPatchModel
from .portrait import FantasyPortraitConditioning, FantasyPortraitEncodeExpression, FantasyPortraitFaceMasks
from .lora import FantasyPortraitLoRA
from .sampler import FantasyPortraitSampler
from .direct import NODES as _DIRECT_NODES

host.register_model_folder()
host.register_gguf_folder()

NODE_CLASS_MAPPINGS = {
    NODE_ID_RENAMES["FantasyPortraitModelLoader"]: FantasyPortraitModelLoader,  # own id (see nodes/ids.py)
    "FantasyPortraitExpressionEncoderLoader": FantasyPortraitExpressionEncoderLoader,
    "FantasyPortraitFaceDetectorLoader": FantasyPortraitFaceDetectorLoader,
    "FantasyPortraitEncodeExpression": FantasyPortraitEncodeExpression,
    "FantasyPortraitFaceMasks": FantasyPortraitFaceMasks,
    "FantasyPortraitConditioning": FantasyPortraitConditioning,
    "FantasyPortraitSampler": FantasyPortraitSampler,
    "FantasyPortraitAdapterLoader": FantasyPortraitAdapterLoader,
    "FantasyPortraitPatchModel": FantasyPortraitPatchModel,
    "FantasyPortraitGuider": FantasyPortraitGuider,
    "FantasyPortraitLoRA": FantasyPortraitLoRA,
    "FantasyPortraitEvaluate": FantasyPortraitEvaluate,
}
NODE_CLASS_MAPPINGS.update({k: cls for k, (cls, _) in _DIRECT_NODES.items()})

NODE_DISPLAY_NAME_MAPPINGS = {
    NODE_ID_RENAMES["FantasyPortraitModelLoader"]: "FantasyPortrait Model Loader (Wan2.1 + adapter)",
    "FantasyPortraitExpressionEncoderLoader": "FantasyPortrait Expression Encoder Loader",
    "FantasyPortraitFaceDetectorLoader": "FantasyPortrait Face Detector Loader",
    "FantasyPortraitEncodeExpression": "FantasyPortrait Encode Expression",
    "FantasyPortraitFaceMasks": "FantasyPortrait Face Masks",
    "FantasyPortraitConditioning": "FantasyPortrait Conditioning",
    "FantasyPortraitSampler": "FantasyPortrait Sampler",
    "FantasyPortraitAdapterLoader": "FantasyPortrait Adapter Loader",
    "FantasyPortraitPatchModel": "FantasyPortrait Patch Model (native)",
    "FantasyPortraitGuider": "FantasyPortrait Guider",
    "FantasyPortraitLoRA": "FantasyPortrait LoRA",
    "FantasyPortraitEvaluate": "FantasyPortrait Evaluate",
}
NODE_DISPLAY_NAME_MAPPINGS.update({k: name for k, (_, name) in _DIRECT_NODES.items()})

"""ComfyUI nodes of the FantasyPortrait pack: thin wrappers that convert ComfyUI types and call
``fantasyportrait_core``."""

from . import host
from .evaluate import FantasyPortraitEvaluate
from .loaders import (FantasyPortraitExpressionEncoderLoader, FantasyPortraitFaceDetectorLoader,
                      FantasyPortraitModelLoader)
from .portrait import FantasyPortraitConditioning, FantasyPortraitEncodeExpression, FantasyPortraitFaceMasks
from .sampler import FantasyPortraitSampler

host.register_model_folder()

NODE_CLASS_MAPPINGS = {
    "FantasyPortraitModelLoader": FantasyPortraitModelLoader,
    "FantasyPortraitExpressionEncoderLoader": FantasyPortraitExpressionEncoderLoader,
    "FantasyPortraitFaceDetectorLoader": FantasyPortraitFaceDetectorLoader,
    "FantasyPortraitEncodeExpression": FantasyPortraitEncodeExpression,
    "FantasyPortraitFaceMasks": FantasyPortraitFaceMasks,
    "FantasyPortraitConditioning": FantasyPortraitConditioning,
    "FantasyPortraitSampler": FantasyPortraitSampler,
    "FantasyPortraitEvaluate": FantasyPortraitEvaluate,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "FantasyPortraitModelLoader": "FantasyPortrait Model Loader",
    "FantasyPortraitExpressionEncoderLoader": "FantasyPortrait Expression Encoder Loader",
    "FantasyPortraitFaceDetectorLoader": "FantasyPortrait Face Detector",
    "FantasyPortraitEncodeExpression": "FantasyPortrait Encode Expression",
    "FantasyPortraitFaceMasks": "FantasyPortrait Face Masks",
    "FantasyPortraitConditioning": "FantasyPortrait Conditioning",
    "FantasyPortraitSampler": "FantasyPortrait Sampler",
    "FantasyPortraitEvaluate": "FantasyPortrait Evaluate",
}

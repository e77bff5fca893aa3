"""Text (umT5-XXL) and image (CLIP ViT-H/14) conditioning for the standalone CLI.

In ComfyUI these come from the native ``CLIPTextEncode`` / ``CLIPVisionEncode`` nodes; the CLI
loads the same encoders from a diffusers-layout Wan2.1-I2V folder (``tokenizer/``,
``text_encoder/``, ``image_processor/``, ``image_encoder/``) with ``transformers``. Formulation:
diffusers ``WanImageToVideoPipeline._get_t5_prompt_embeds`` (umT5) and the reference
``WanImageEncoder.encode_image`` (``diffsynth/models/wan_video_image_encoder.py``: the whole frame
stretched to 224×224, CLIP penultimate hidden states, 257 tokens).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from fantasyportrait_core.model.attention import TEXT_CONTEXT_TOKENS

CLIP_IMAGE_SIZE = 224  # CLIP ViT-H/14 input side
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The reference's default negative prompt (infer.py), kept verbatim: it is what the model was tuned with.
DEFAULT_NEGATIVE_PROMPT = (
    "人物静止不动，静止，色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def clip_pixels(image: np.ndarray, size: int = CLIP_IMAGE_SIZE, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """The CLIP vision input of a reference frame, as the reference builds it.

    The whole frame is stretched to ``size × size`` (no crop: on a wide two-person image both faces
    stay in view): bicubic ``F.interpolate`` (``align_corners=False``, no antialias) of the image in
    ``[-1, 1]``, mapped to ``[0, 1]`` and normalised with the CLIP mean/std (reference
    ``WanImageEncoder.encode_image`` in ``diffsynth/models/wan_video_image_encoder.py``; ComfyUI's
    ``CLIPVisionEncode`` with ``crop = none`` stretches the same way).

    Args:
        image: uint8 RGB ``[H, W, 3]`` (the reference at generation size).
    Returns:
        float32 ``[1, 3, size, size]``.
    Raises:
        ValueError: if ``image`` is not ``[H, W, 3]``.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"the CLIP image must be [H, W, 3] RGB, got {image.shape}")
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() * (2 / 255) - 1
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class WanConditioners:
    """umT5 text encoder + CLIP vision encoder loaded from a diffusers Wan2.1-I2V folder.

    Raises:
        ImportError: if ``transformers`` is missing (names the package).
        FileNotFoundError: if a sub-folder is missing (names it).
    """

    def __init__(self, wan_dir: str, dtype: torch.dtype = torch.bfloat16, device="cpu", image: bool = True):
        """``image=False``: no CLIP vision encoder (Wan2.2-I2V-A14B has none; :meth:`image` then raises)."""
        try:
            from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel
        except ImportError as e:
            raise ImportError("the CLI's real-model mode needs `pip install transformers` for umT5 and CLIP") from e
        for sub in ("tokenizer", "text_encoder") + (("image_processor", "image_encoder") if image else ()):
            if not os.path.isdir(os.path.join(wan_dir, sub)):
                raise FileNotFoundError(f"{wan_dir} has no {sub}/ folder; point --wan-dir at a diffusers "
                                        f"Wan2.1-I2V-14B-720P-Diffusers download")
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(os.path.join(wan_dir, "tokenizer"))
        self.text_encoder = UMT5EncoderModel.from_pretrained(os.path.join(wan_dir, "text_encoder"), torch_dtype=dtype).eval()
        self.image_processor = self.image_encoder = None
        if image:
            self.image_processor = CLIPImageProcessor.from_pretrained(os.path.join(wan_dir, "image_processor"))
            self.image_encoder = CLIPVisionModel.from_pretrained(os.path.join(wan_dir, "image_encoder"),
                                                                 torch_dtype=torch.float32).eval()

    @torch.no_grad()
    def text(self, prompt: str) -> torch.Tensor:
        """``prompt`` -> ``[1, L, 4096]`` embeddings of its real tokens (padding is added later)."""
        t = self.tokenizer([prompt], padding="max_length", max_length=TEXT_CONTEXT_TOKENS, truncation=True,
                           add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        n = int(t.attention_mask.sum())
        self.text_encoder.to(self.device)
        out = self.text_encoder(t.input_ids.to(self.device), t.attention_mask.to(self.device)).last_hidden_state
        self.text_encoder.to("cpu")
        return out[:, :n].float().cpu()

    @torch.no_grad()
    def image(self, image: np.ndarray) -> torch.Tensor:
        """uint8 RGB ``[H, W, 3]`` -> CLIP penultimate hidden states ``[1, 257, 1280]``.

        The input is :func:`clip_pixels` (whole frame stretched, as the reference), not the image
        processor's short-side resize + centre crop; only its mean, std and size are used.
        """
        proc = self.image_processor
        size = (getattr(proc, "crop_size", None) or {}).get("height", CLIP_IMAGE_SIZE)
        pixels = clip_pixels(image, size, getattr(proc, "image_mean", None) or CLIP_MEAN,
                             getattr(proc, "image_std", None) or CLIP_STD)
        self.image_encoder.to(self.device)
        out = self.image_encoder(pixels.to(self.device), output_hidden_states=True).hidden_states[-2]
        self.image_encoder.to("cpu")
        return out.float().cpu()

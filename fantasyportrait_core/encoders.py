"""Text (umT5-XXL) and image (CLIP ViT-H/14) conditioning for the standalone CLI.

In ComfyUI these come from the native ``CLIPTextEncode`` / ``CLIPVisionEncode`` nodes; the CLI
loads the same encoders from a diffusers-layout Wan2.1-I2V folder (``tokenizer/``,
``text_encoder/``, ``image_processor/``, ``image_encoder/``) with ``transformers``. Formulation:
diffusers ``WanImageToVideoPipeline._get_t5_prompt_embeds`` / ``encode_image`` (CLIP penultimate
hidden states, 257 tokens).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .attention import TEXT_CONTEXT_TOKENS

# The reference's default negative prompt (infer.py), kept verbatim: it is what the model was tuned with.
DEFAULT_NEGATIVE_PROMPT = (
    "人物静止不动，静止，色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


class WanConditioners:
    """umT5 text encoder + CLIP vision encoder loaded from a diffusers Wan2.1-I2V folder.

    Raises:
        ImportError: if ``transformers`` is missing (names the package).
        FileNotFoundError: if a sub-folder is missing (names it).
    """

    def __init__(self, wan_dir: str, dtype: torch.dtype = torch.bfloat16, device="cpu"):
        try:
            from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel
        except ImportError as e:
            raise ImportError("the CLI's real-model mode needs `pip install transformers` for umT5 and CLIP") from e
        for sub in ("tokenizer", "text_encoder", "image_processor", "image_encoder"):
            if not os.path.isdir(os.path.join(wan_dir, sub)):
                raise FileNotFoundError(f"{wan_dir} has no {sub}/ folder; point --wan-dir at a diffusers "
                                        f"Wan2.1-I2V-14B-720P-Diffusers download")
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(os.path.join(wan_dir, "tokenizer"))
        self.text_encoder = UMT5EncoderModel.from_pretrained(os.path.join(wan_dir, "text_encoder"), torch_dtype=dtype).eval()
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
        """uint8 RGB ``[H, W, 3]`` -> CLIP penultimate hidden states ``[1, 257, 1280]``."""
        pixels = self.image_processor(images=image, return_tensors="pt").pixel_values
        self.image_encoder.to(self.device)
        out = self.image_encoder(pixels.to(self.device), output_hidden_states=True).hidden_states[-2]
        self.image_encoder.to("cpu")
        return out.float().cpu()

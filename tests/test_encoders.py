"""The CLI's CLIP image input is the reference's: the whole frame stretched to 224×224."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fantasyportrait_core.model.encoders import WanConditioners


class RecordingVision(torch.nn.Module):
    """Stands in for CLIPVisionModel (2.5 GB): records the pixels it is given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, pixel_values, output_hidden_states=True):
        self.seen.append(pixel_values)
        h = torch.zeros(1, 257, 8)
        return type("Out", (), {"hidden_states": (h, h, h)})()


def _conditioners():
    CLIPImageProcessor = pytest.importorskip("transformers").CLIPImageProcessor  # peft brings transformers

    c = WanConditioners.__new__(WanConditioners)
    c.device = "cpu"
    c.image_processor = CLIPImageProcessor()  # the default CLIP config: 224, CLIP mean/std; no weights
    c.image_encoder = RecordingVision()
    return c


def test_cli_clip_input_is_the_whole_frame_stretched_to_224():
    """720×416 two-person layout: a red strip on the far left and a green one on the far right
    must reach CLIP (a short-side resize + centre crop keeps only the central 58 % of the width)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (416, 720, 3), dtype=np.uint8)
    image[:, :120] = (255, 0, 0)
    image[:, -120:] = (0, 255, 0)
    c = _conditioners()
    c.image(image)
    (pixels,) = c.image_encoder.seen

    # The reference formulation (WanImageEncoder.encode_image), written out here independently.
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() * (2 / 255) - 1
    x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False).mul(0.5).add(0.5)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels, (x - mean) / std, rtol=0, atol=1e-6)

    # Both strips are there, each about 120/720 of the 224 columns wide.
    rgb = pixels * std + mean
    red = (rgb[0, 0] > 0.9) & (rgb[0, 1] < 0.1)
    green = (rgb[0, 1] > 0.9) & (rgb[0, 0] < 0.1)
    assert red[:, :30].all() and green[:, -30:].all()
    assert 34 <= red.all(0).sum() <= 39 and 34 <= green.all(0).sum() <= 39

    # and it is not what the processor's own crop gives
    cropped = c.image_processor(images=image, return_tensors="pt").pixel_values
    assert (cropped - pixels).abs().max() > 1.0

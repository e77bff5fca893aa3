"""Wan2.2-I2V-A14B experts on the CLI (experimental): --transformer + --transformer-2 in the Comfy-Org layout,
the report labels it experimental and lists which expert ran at each step; bad options are named."""

import json

import torch

from fantasyportrait_core.cli import main
from fantasyportrait_core.media.video import probe_video
from fantasyportrait_core.model.build import TINY_WAN22_EXPERT, build_transformer
from fantasyportrait_core.weights.keys import COMFY_PREFIX

from .conftest import data_path


def test_cli_runs_both_experts_and_says_it_is_experimental(tmp_path, tiny, monkeypatch, capsys):
    import fantasyportrait_core.model.encoders as enc

    from . import checkpoint_writers as W

    _, adapter, vae, encoder = tiny
    torch.manual_seed(2)
    high, low = build_transformer(TINY_WAN22_EXPERT).eval(), build_transformer(TINY_WAN22_EXPERT).eval()
    wan_dir = tmp_path / "wan"
    vae.save_pretrained(str(wan_dir / "vae"))
    h = W.write_wan_original(high, str(tmp_path / "wan2.2_i2v_high_noise_14B_fp16.safetensors"), prefix=COMFY_PREFIX)
    lo = W.write_wan_original(low, str(tmp_path / "wan2.2_i2v_low_noise_14B_fp16.safetensors"), prefix=COMFY_PREFIX)
    a_path = W.write_adapter_repacked(adapter, str(tmp_path / "fp.safetensors"), encoder)
    made = {}

    class StandIn:  # umT5 stand-in (11 GB); Wan2.2 asks for no CLIP image encoder
        def __init__(self, wan_dir_, dtype, device, image=True):
            made["image"] = image

        def text(self, prompt):
            return torch.randn(1, 7, TINY_WAN22_EXPERT["text_dim"])

    monkeypatch.setattr(enc, "WanConditioners", StandIn)
    out = str(tmp_path / "wan22.mp4")
    args = ["run", "--image", data_path("man.jpeg"), "--driving", data_path("jgz.mp4"), "--out", out,
            "--wan-dir", str(wan_dir), "--transformer", h, "--transformer-2", lo, "--adapter", a_path, "--dtype",
            "fp32", "--frames", "5", "--max-size", "64", "--steps", "4", "--cfg", "2.0", "--device", "cpu",
            "--adapter-on", "high"]
    assert main(args) == 0
    report = json.loads((t := capsys.readouterr().out)[t.index("{"):])
    assert made["image"] is False
    assert "Wan2.2-I2V-A14B" in report["model"] and "experimental" in report["model"] and "adapter on high" in report["model"]
    # 4 steps, shift 5: sigmas 1, 0.9375, 0.833, 0.625: the first two at t >= 900
    assert report["experts_by_step"] == ["high", "high", "low", "low"]
    assert probe_video(out)["frames"] == 5
    assert main(args[:-2] + ["--boundary", "1.5"]) == 2
    assert "--boundary must be between 0 and 1" in capsys.readouterr().err
    assert main(args[:-4] + ["--lora", a_path]) == 2
    assert "--lora on Wan2.2 experts is not supported" in capsys.readouterr().err

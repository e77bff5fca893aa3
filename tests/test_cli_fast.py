"""CLI options for few-step and styled sampling: --lora (repeatable), --sampler, --preset, --sigmas,
--denoise with --init-video, guidance interval."""

import json

import pytest

from fantasyportrait_core.cli import _parser, job_from_args, main
from fantasyportrait_core.model.build import TINY_TRANSFORMER, build_transformer
from fantasyportrait_core.media.video import probe_video

from . import checkpoint_writers as W
from .conftest import data_path


def test_cli_lora_preset_and_init_video(tmp_path, capsys):
    lora = str(tmp_path / "lightx2v_tiny.safetensors")
    W.write_wan_lora(build_transformer(TINY_TRANSFORMER), lora, lightx2v=True,
                     unmatched=("diffusion_model.blocks.9.self_attn.q.lora_down.weight",))
    style = str(tmp_path / "style.safetensors")
    W.write_wan_lora(build_transformer(TINY_TRANSFORMER), style, layout="lora_unet", seed=3)
    out = str(tmp_path / "fast.mp4")
    rc = main(["run", "--tiny-random", "--image", data_path("man.jpeg"), "--driving", data_path("jgz.mp4"),
               "--out", out, "--frames", "5", "--max-size", "64", "--device", "cpu", "--lora", lora,
               "--lora", f"{style}:0.6", "--preset", "lightx2v", "--portrait-cfg-end", "0.5",
               "--portrait-scale-steps", "0.5-1:0.8", "--init-video", data_path("jgz.mp4")])
    assert rc == 0
    text = capsys.readouterr().out
    report = json.loads(text[text.index("{"):])
    assert report["sampler"] == "lightx2v"
    assert [(r["lora"], r["strength"], r["unmatched_keys"]) for r in report["loras"]] == [
        ("lightx2v_tiny.safetensors", 1.0, 1), ("style.safetensors", 0.6, 0)]
    assert probe_video(out)["frames"] == 5


def test_cli_denoise_needs_a_start_and_options_are_checked(tmp_path, capsys):
    base = ["run", "--tiny-random", "--image", data_path("man.jpeg"), "--driving", data_path("jgz.mp4"),
            "--out", str(tmp_path / "x.mp4"), "--frames", "5", "--max-size", "64", "--device", "cpu", "--steps", "2"]
    assert main(base + ["--denoise", "0.5"]) == 2
    assert "--init-video" in capsys.readouterr().err
    args = _parser().parse_args(base + ["--sigmas", "1, 0.6, 0", "--sampler", "unipc", "--cfg-end", "0.5"])
    kw = job_from_args(args).sampling
    assert kw.sigmas == [1.0, 0.6, 0.0] and kw.sampler == "unipc" and kw.cfg_range == (0.0, 0.5)
    with pytest.raises(ValueError, match="--sigmas"):
        job_from_args(_parser().parse_args(base + ["--sigmas", "1,half,0"]))
    with pytest.raises(SystemExit):
        _parser().parse_args(base + ["--sampler", "heun"])

import json

from fantasyportrait_core.cli import main
from fantasyportrait_core.media.video import probe_video

from .conftest import data_path


def test_cli_run_two_characters(tmp_path, capsys):
    out = str(tmp_path / "two.mp4")
    rc = main(["run", "--tiny-random", "--image", data_path("two_person.png"), "--driving", data_path("biden.mp4"),
               data_path("trump.mp4"), "--out", out, "--frames", "9", "--max-size", "128", "--steps", "1",
               "--device", "cpu"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in text
    report = json.loads(text[text.index("{"):])
    assert len(report["reference_faces"]) == 2
    assert report["reference_faces"][0]["box"][0] < report["reference_faces"][1]["box"][0]
    assert report["faces_driven_by"] == {"face #0": "biden.mp4 #0", "face #1": "trump.mp4 #0"}
    p = probe_video(out)
    assert (p["frames"], p["width"], p["height"]) == (9, 128, 80)  # 1084x610 -> 128x72 -> rounded up to /16
    assert (tmp_path / "two_faces.png").exists()


def test_cli_single_keeps_driving_audio(tmp_path, capsys):
    out = str(tmp_path / "one.mp4")
    assert main(["run", "--tiny-random", "--image", data_path("man.jpeg"), "--driving", data_path("jgz.mp4"),
                 "--out", out, "--frames", "6", "--max-size", "96", "--steps", "1", "--device", "cpu"]) == 0
    p = probe_video(out)
    assert p["frames"] == 5 and p["audio"]  # 6 floored to 4k+1
    report = json.loads((t := capsys.readouterr().out)[t.index("{"):])
    (driver,) = report["characters"]
    assert (driver["source_fps"], driver["fps"], report["fps"]) == (15.0, 25.0, 25.0)  # resampled as the reference
    assert p["fps"] == 25.0


def test_cli_reports_bad_input(tmp_path, capsys):
    rc = main(["run", "--tiny-random", "--image", str(tmp_path / "missing.png"), "--driving", data_path("jgz.mp4"),
               "--out", str(tmp_path / "x.mp4")])
    assert rc == 2 and "missing.png" in capsys.readouterr().err


def test_drivers_with_other_frame_rates_are_resampled():
    import numpy as np

    from fantasyportrait_core.media.video import Video, resample_fps

    v = Video(np.arange(50).reshape(50, 1, 1, 1).astype(np.uint8).repeat(3, -1), 25.0)
    r = resample_fps(v, 15.0)
    assert len(r) == 30 and r.fps == 15.0
    assert r.frames[:, 0, 0, 0].tolist()[:6] == [0, 2, 3, 5, 7, 8]  # nearest frames in time


def test_cli_real_mode_loads_checkpoints(tmp_path, tiny, monkeypatch, capsys):
    """Real-model mode with tiny files in the published layouts: transformer (original keys),
    repacked adapter + pd_fpg, a diffusers VAE folder. umT5/CLIP are replaced by a stand-in (their
    real weights are 11 GB and 2.5 GB); everything else is the real path."""
    import torch

    import fantasyportrait_core.model.encoders as enc

    from . import checkpoint_writers as W

    transformer, adapter, vae, encoder = tiny
    wan_dir = tmp_path / "wan"
    vae.save_pretrained(str(wan_dir / "vae"))
    t_path = W.write_wan_original(transformer, str(tmp_path / "wan_i2v.safetensors"))
    a_path = W.write_adapter_repacked(adapter, str(tmp_path / "fp.safetensors"), encoder)

    class StandIn:
        def __init__(self, wan_dir_, dtype, device):
            assert wan_dir_ == str(wan_dir)

        def text(self, prompt):
            return torch.randn(1, 7, transformer.config.text_dim)

        def image(self, image):
            return torch.randn(1, 257, transformer.config.image_dim)

    monkeypatch.setattr(enc, "WanConditioners", StandIn)
    out = str(tmp_path / "real.mp4")
    rc = main(["run", "--image", data_path("man.jpeg"), "--driving", data_path("jgz.mp4"), "--out", out,
               "--wan-dir", str(wan_dir), "--transformer", t_path, "--adapter", a_path, "--dtype", "fp32",
               "--frames", "5", "--max-size", "64", "--steps", "1", "--cfg", "2.0", "--device", "cpu"])
    assert rc == 0
    report = json.loads((t := capsys.readouterr().out)[t.index("{"):])
    assert report["random_weights"] is False and report["frames"] == 5
    assert probe_video(out)["frames"] == 5

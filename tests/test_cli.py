import json

from fantasyportrait_core.cli import main
from fantasyportrait_core.video import probe_video

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
    p = probe_video(out)
    assert (p["frames"], p["width"], p["height"]) == (9, 128, 80)  # 1084x610 -> 128x72 -> rounded up to /16
    assert (tmp_path / "two_faces.png").exists()


def test_cli_single_keeps_driving_audio(tmp_path, capsys):
    out = str(tmp_path / "one.mp4")
    assert main(["run", "--tiny-random", "--image", data_path("man.jpeg"), "--driving", data_path("jgz.mp4"),
                 "--out", out, "--frames", "6", "--max-size", "96", "--steps", "1", "--device", "cpu"]) == 0
    p = probe_video(out)
    assert p["frames"] == 5 and p["audio"]  # 6 floored to 4k+1


def test_cli_reports_bad_input(tmp_path, capsys):
    rc = main(["run", "--tiny-random", "--image", str(tmp_path / "missing.png"), "--driving", data_path("jgz.mp4"),
               "--out", str(tmp_path / "x.mp4")])
    assert rc == 2 and "missing.png" in capsys.readouterr().err


def test_drivers_with_other_frame_rates_are_resampled():
    import numpy as np

    from fantasyportrait_core.video import Video, resample_fps

    v = Video(np.arange(50).reshape(50, 1, 1, 1).astype(np.uint8).repeat(3, -1), 25.0)
    r = resample_fps(v, 15.0)
    assert len(r) == 30 and r.fps == 15.0
    assert r.frames[:, 0, 0, 0].tolist()[:6] == [0, 2, 3, 5, 7, 8]  # nearest frames in time

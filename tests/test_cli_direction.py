"""CLI ``run`` with --strength / --strength-keys / --motion / --neutral-frame / --save-expression /
--expression: the latent sampled is today's at s = 1, a saved performance gives the identical latent,
bad input stops before any model work."""

import json

import pytest
import torch

from fantasyportrait_core import cli

from fantasyportrait_core.runtime import runner
from fantasyportrait_core.runtime.job import Job, MemoryOptions
from fantasyportrait_core.runtime.plan import plan_run
from fantasyportrait_core.sampling import generate
from fantasyportrait_core.drive.performance import load_performance

from .conftest import data_path


@pytest.fixture
def captured(monkeypatch):
    """Every latent and portrait condition the CLI samples."""
    seen = {"latents": [], "windows": []}
    real = generate.generate_latent

    def spy(transformer, state, cond, portrait, *a, **k):
        seen["windows"].append(portrait.windows.clone())
        out = real(transformer, state, cond, portrait, *a, **k)
        seen["latents"].append(out.clone())
        return out

    monkeypatch.setattr(generate, "generate_latent", spy)
    return seen


def _run(tmp_path, name, *extra, driving=True):
    args = ["run", "--tiny-random", "--image", data_path("man.jpeg"), "--out", str(tmp_path / f"{name}.mp4"),
            "--frames", "5", "--max-size", "64", "--steps", "2", "--device", "cpu", "--detector", "mtcnn"]
    if driving:
        args += ["--driving", data_path("jgz.mp4")]
    return cli.main(args + list(extra))


def _report(capsys):
    text = capsys.readouterr().out
    return json.loads(text[text.index("{"):])


def test_s_one_is_todays_latent_and_a_saved_performance_gives_the_identical_latent(tmp_path, captured, capsys):
    perf = str(tmp_path / "take.safetensors")
    assert _run(tmp_path, "plain", "--save-expression", perf) == 0
    assert _report(capsys)["saved_expressions"] == [perf]
    assert _run(tmp_path, "ones", "--strength", "head_pose=1,eyes=1,emotion=1,mouth=1", "--strength-keys",
                "mouth=0:1,4:1", "--motion", "absolute") == 0
    capsys.readouterr()
    assert _run(tmp_path, "saved", "--expression", perf, driving=False) == 0
    report = _report(capsys)
    assert report["characters"][0]["video"] == "jgz.mp4" and report["frames"] == 5
    plain, ones, saved = captured["latents"]
    assert torch.equal(ones, plain) and torch.equal(saved, plain)
    back = load_performance(perf)
    assert back.source == "jgz.mp4" and back.num_frames == 5 and back.fps == 25.0


def test_held_head_pose_and_relative_motion_reach_the_condition(tmp_path, captured, capsys):
    assert _run(tmp_path, "plain") == 0
    capsys.readouterr()
    assert _run(tmp_path, "held", "--strength", "head_pose=0", "--strength-keys", "mouth=0:1,4:0.3") == 0
    report = _report(capsys)
    assert report["direction"] == [{"character": 0, "settings": "head_pose=0, mouth=0:1, 4:0.3"}]
    assert _run(tmp_path, "relative", "--motion", "relative", "--neutral-frame", "2") == 0
    plain, held, rel = captured["windows"]
    assert not torch.equal(plain, held) and not torch.equal(plain, rel)


@pytest.mark.parametrize("extra, words", [
    (["--strength", "nose=0"], ["--strength", "unknown channel 'nose'"]),
    (["--strength", "mouth=3"], ["between 0 and 2, got 3"]),
    (["--strength-keys", "mouth=0:1,8:0.5,4:1"], ["must increase"]),
    (["--strength-keys", "mouth=0:1,40:0.5"], ["key at frame 40 is outside", "generate more frames"]),
    (["--motion", "relative", "--neutral-frame", "9"], ["neutral frame 9 is outside"]),
    (["--strength", "1:mouth=1"], ["character 1", "1 character"]),
    (["--save-expression", "take.pt"], ["--save-expression", ".safetensors"]),
    (["--expression-speed", "2"], ["--expression-speed/-loop/-start/-end apply to saved performances"]),
])
def test_bad_direction_input_stops_before_any_model_work(tmp_path, capsys, monkeypatch, extra, words):
    monkeypatch.setattr(runner, "tiny_random_models", lambda *a, **k: pytest.fail("built a model for bad input"))
    assert _run(tmp_path, "bad", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and all(w in err for w in words), err


def test_bad_saved_performance_input(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, "tiny_random_models", lambda *a, **k: pytest.fail("built a model for bad input"))
    not_perf = tmp_path / "notes.safetensors"
    not_perf.write_bytes(b"hello")
    assert _run(tmp_path, "bad", "--expression", str(not_perf), driving=False) == 2
    err = capsys.readouterr().err.strip()
    assert "--expression" in err and "not a saved FantasyPortrait performance" in err and "\n" not in err
    # a performance shorter than asked with a loop requested is looped; without, --frames is capped as for videos
    from .test_direction import _driver
    from fantasyportrait_core.drive.performance import save_performance

    short = save_performance(str(tmp_path / "short.safetensors"), _driver(3))
    assert _run(tmp_path, "bad", "--expression", short, "--people", "2", driving=False) == 2
    assert "--people" in capsys.readouterr().err
    plan = plan_run(cli.job_from_args(cli._parser().parse_args(
        ["run", "--tiny-random", "--image", data_path("man.jpeg"), "--expression", short, "--out",
         str(tmp_path / "x.mp4"), "--frames", "9", "--expression-loop", "pingpong"])))
    assert plan.performances[0].num_frames == 9
    assert plan.performances[0].track.boxes[:, 0].tolist() == [20, 21, 22, 21, 20, 21, 22, 21, 20]
    plan = plan_run(cli.job_from_args(cli._parser().parse_args(
        ["run", "--tiny-random", "--image", data_path("man.jpeg"), "--expression", short, "--out",
         str(tmp_path / "x.mp4"), "--frames", "5", "--expression-loop", "repeat", "--expression-start", "1"])))
    assert plan.performances[0].track.boxes[:, 0].tolist() == [21, 22, 21, 22, 21]
    with pytest.raises(cli.InputError, match="end frame 7 must be after start 0 and at most its 3 frames"):
        plan_run(cli.job_from_args(cli._parser().parse_args(
            ["run", "--tiny-random", "--image", data_path("man.jpeg"), "--expression", short, "--out",
             str(tmp_path / "x.mp4"), "--expression-end", "7"])))
    with pytest.raises(cli.InputError, match="key at frame 6 is outside"):
        plan_run(cli.job_from_args(cli._parser().parse_args(
            ["run", "--tiny-random", "--image", data_path("man.jpeg"), "--expression", short, "--out",
             str(tmp_path / "x.mp4"), "--frames", "9", "--strength-keys", "eyes=0:1,6:0"])))


def test_each_character_is_directed_against_its_own_face(tiny, tmp_path):
    """Two characters, `0:` / `1:` prefixes: character 0 untouched (same object), character 1's head pose
    held at the baseline of the face it animates, the performances saved as FILE and FILE_1."""
    import numpy as np
    from types import SimpleNamespace

    from fantasyportrait_core.drive.direction import baseline_features, directions_from_args
    from fantasyportrait_core.faces.face import Face

    from .test_direction import _driver

    encoder = tiny[3]
    rng = np.random.default_rng(2)
    ref = rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)
    lm = np.array([[27, 26], [37, 26], [32, 32], [28, 38], [36, 38]], dtype=float)
    faces = [Face(np.array([20.0, 16, 44, 44]), lm, 0.9), Face(np.array([84.0, 16, 108, 44]), lm + [64, 0], 0.9)]
    drivers = [_driver(5, seed=1), _driver(5, seed=2)]
    plan = SimpleNamespace(directions=directions_from_args(2, ["1:head_pose=0"], ["0:eyes=0:1,4:1"]))
    job = Job(memory=MemoryOptions(device="cpu"), save_expression=str(tmp_path / "take.safetensors"))
    report = {}
    out = runner.direct_drivers(SimpleNamespace(encoder=encoder), ref, faces, drivers, plan, job, 5, report)
    assert out[0] is drivers[0]
    base = baseline_features(encoder, ref, faces)
    assert not torch.allclose(base[0, :6], base[1, :6])  # the two faces differ: the test can tell them apart
    assert torch.equal(out[1].features[:, :6], base[1, :6].expand(5, -1))
    assert torch.equal(out[1].features[:, 6:], drivers[1].features[:, 6:])
    assert report["saved_expressions"] == [str(tmp_path / "take.safetensors"), str(tmp_path / "take_1.safetensors")]
    assert torch.equal(load_performance(report["saved_expressions"][1]).features, drivers[1].features)

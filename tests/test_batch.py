"""``cli batch``: one model load for every job, resume by existing outputs, failures reported and
skipped, malformed lines refused before any job, Ctrl-C after the current step, and under torchrun
(2 gloo processes) every job run exactly once with one merged report."""

import json
import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fantasyportrait_core import cli
from fantasyportrait_core.sampling import generate as P
from fantasyportrait_core.runtime import runner

from .conftest import data_path

FAST = ["--tiny-random", "--frames", "5", "--max-size", "64", "--steps", "1", "--device", "cpu", "--detector", "mtcnn"]


def _performance(path, frames=5, seed=0):
    """A saved performance (what --save-expression writes) of random features: no driving video to
    detect, so a job costs one reference detection and a tiny sampling."""
    from fantasyportrait_core.drive.performance import save_performance
    from fantasyportrait_core.faces.face import FaceTrack

    g = torch.Generator().manual_seed(seed)
    track = FaceTrack(np.tile([0.0, 0, 32, 32], (frames, 1)), np.zeros((frames, 5, 2)), np.ones(frames, bool))
    return save_performance(str(path), SimpleNamespace(features=torch.randn(frames, 554, generator=g) * 0.1,
                                                       track=track, fps=25.0, source="take.mp4", track_index=0,
                                                       people_seen=1))


def _jobs(tmp_path, lines, name="jobs.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    return str(path)


@pytest.fixture
def loads(monkeypatch):
    """Counts model loads and sampling steps (the real ones run)."""
    seen = {"loads": 0, "steps": []}
    real_models, real_latent = runner.tiny_random_models, P.generate_latent

    def models(seed=0):
        seen["loads"] += 1
        return real_models(seed)

    def latent(*a, callback=None, **k):
        steps = []
        seen["steps"].append(steps)

        def counted(info):
            steps.append(1)
            callback(info)

        return real_latent(*a, callback=counted, **k)

    monkeypatch.setattr(runner, "tiny_random_models", models)
    monkeypatch.setattr(P, "generate_latent", latent)
    return seen


def test_batch_one_load_resume_and_failures(tmp_path, loads, capsys, caplog):
    image = data_path("man.jpeg")
    perf = _performance(tmp_path / "take.safetensors")
    jobs = _jobs(tmp_path, [
        {"image": image, "expression": [perf], "out": "a.mp4"},
        "",
        {"image": image, "expression": perf, "seed": 3, "portrait-cfg": 2.5},  # named after image and driver
        {"image": image, "expression": [perf], "face_order": "1", "out": "sub/c.mp4"},  # one face: fails at run time
    ])
    out = tmp_path / "out"
    assert cli.main(["batch", jobs, "--out", str(out)] + FAST) == 1
    report = json.loads((out / "batch_report.json").read_text())
    rows = {r["line"]: r for r in report["jobs"]}
    assert [rows[n]["status"] for n in (1, 3, 4)] == ["done", "done", "failed"]
    assert rows[3]["out"] == str(out / "man__take.mp4") and (out / "man__take.mp4").is_file()
    assert "--face-order uses face 1" in rows[4]["error"] and rows[4]["seconds"] > 0
    assert not (out / "sub" / "c.mp4").exists()
    assert [r.getMessage() for r in caplog.records if "failed after" in r.getMessage()] == [
        f"[FantasyPortrait] job line 4 (c.mp4) failed after {rows[4]['seconds']:.1f} s: {rows[4]['error']}"]
    assert loads["loads"] == 1 and len(loads["steps"]) == 2  # one model for all; the failing job never sampled
    stamp = os.stat(out / "a.mp4").st_mtime_ns

    assert cli.main(["batch", jobs, "--out", str(out)] + FAST) == 1  # rerun: resumes
    report = json.loads((out / "batch_report.json").read_text())
    assert [r["status"] for r in report["jobs"]] == ["skipped", "skipped", "failed"]
    assert report["summary"] == {"skipped": 2, "failed": 1}
    assert os.stat(out / "a.mp4").st_mtime_ns == stamp and len(loads["steps"]) == 2
    assert "2 skipped" in capsys.readouterr().out


def test_malformed_lines_are_refused_before_any_job(tmp_path, loads, capsys):
    image = data_path("man.jpeg")
    perf = _performance(tmp_path / "take.safetensors")
    good = {"image": image, "expression": [perf]}
    jobs = _jobs(tmp_path, [
        json.dumps(good),
        '{"image": "a.png", ',                            # 2: not JSON
    ])
    assert cli.main(["batch", jobs, "--out", str(tmp_path / "o")] + FAST) == 2
    assert f"{jobs}:2: not JSON" in capsys.readouterr().err
    jobs = _jobs(tmp_path, [
        good,                                              # 1: fine
        {**good, "stepz": 3},                              # 2: unknown key
        {**good, "lora": "x.safetensors"},                 # 3: a model option
        {**good, "steps": "many"},                         # 4: not a number
        {"image": str(tmp_path / "missing.png"), "expression": [perf]},  # 5: missing file
        {**good, "out": "man__take.mp4"},                  # 6: the same output as line 1
        {"driving": [perf]},                               # 7: no image
    ])
    assert cli.main(["batch", jobs, "--out", str(tmp_path / "o")] + FAST) == 2
    err = capsys.readouterr().err
    assert "6 job(s) refused, nothing run" in err
    for n, words in [(2, "unknown key 'stepz'"), (3, "'lora' sets the model"), (4, "--steps"), (5, "missing.png"),
                     (6, "as line 1 does"), (7, "needs image")]:
        assert f"{jobs}:{n}: " in err and words in err, (n, words, err)
    assert f"{jobs}:1:" not in err
    assert loads["loads"] == 0 and loads["steps"] == []
    csv_path = tmp_path / "jobs.csv"
    csv_path.write_text(f"image,expression,steps,people\n{image},{perf},2,\n{image},{perf};{perf},x,\n")
    assert cli.main(["batch", str(csv_path), "--out", str(tmp_path / "o")] + FAST) == 2
    err = capsys.readouterr().err
    assert f"{csv_path}:3: " in err and "--steps" in err and f"{csv_path}:2:" not in err


def test_csv_lists_and_defaults_reach_the_job(tmp_path):
    from fantasyportrait_core.runtime.batch import build_jobs

    image = data_path("two_person.png")
    a, b = data_path("biden.mp4"), data_path("trump.mp4")
    path = tmp_path / "jobs.csv"
    path.write_text(f"image,driving,people,steps,strength,out\n{image},{a};{b},1;1,4,mouth=0.5;eyes=1.5,x/y.mov\n"
                    f"{image},{a},2,,,\n")
    args = cli._parser().parse_args(["batch", str(path), "--out", str(tmp_path / "o"), "--steps", "7", "--seed", "5",
                                     "--tiny-random", "--device", "cpu", "--detector", "mtcnn"])
    defaults = SimpleNamespace(**{k: v for k, v in vars(args).items() if k not in ("jobs", "out_dir")})
    first, second = build_jobs(str(path), str(tmp_path / "o"), defaults, cli._line_parser(), cli.job_from_args)
    assert (first.line, first.job.driving, first.job.people) == (2, [a, b], [1, 1])
    assert (first.job.sampling.steps, first.job.sampling.seed, first.job.strength) == (4, 5, ["mouth=0.5", "eyes=1.5"])
    assert first.out == str(tmp_path / "o" / "x" / "y.mov")
    assert (second.line, second.job.people, second.job.sampling.steps) == (3, [2], 7)
    assert second.out == str(tmp_path / "o" / "two_person__biden.mp4")


def test_ctrl_c_stops_after_the_current_step_and_keeps_finished_outputs(tmp_path, monkeypatch, capsys):
    image = data_path("man.jpeg")
    perf = _performance(tmp_path / "take.safetensors")
    jobs = _jobs(tmp_path, [{"image": image, "expression": [perf], "out": f"{k}.mp4"} for k in "abc"])
    real, steps = P.generate_latent, []

    def spy(*a, callback=None, **k):
        job = len(steps)
        steps.append(0)

        def step(info):
            steps[job] += 1
            if job == 1 and steps[job] == 1:  # Ctrl-C arrives during the second job's first step
                os.kill(os.getpid(), signal.SIGINT)
            callback(info)

        return real(*a, callback=step, **k)

    monkeypatch.setattr(P, "generate_latent", spy)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    rc = cli.main(["batch", jobs, "--out", str(tmp_path / "o")] + FAST + ["--steps", "3"])
    assert rc == 130 and steps == [3, 1]  # the step in progress finished, no other began
    report = json.loads((tmp_path / "o" / "batch_report.json").read_text())
    assert [r["status"] for r in report["jobs"]] == ["done", "interrupted", "not run"]
    assert (tmp_path / "o" / "a.mp4").is_file()
    assert not (tmp_path / "o" / "b.mp4").exists() and not (tmp_path / "o" / "c.mp4").exists()
    assert not [f for f in os.listdir(tmp_path / "o") if ".partial" in f]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers put back


def _rank(rank: int, world: int, port: int, argv: list, out_dir: str):
    """One rank of the CLI with the environment ``torchrun --nproc-per-node WORLD`` gives its workers
    (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT); its exit code and log go to ``out_dir``."""
    import logging

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    logger = logging.getLogger("FantasyPortrait")
    logger.setLevel(logging.INFO)
    logger.addHandler(logging.FileHandler(os.path.join(out_dir, f"log{rank}")))
    rc = cli.main(argv)
    with open(os.path.join(out_dir, f"rc{rank}"), "w") as f:
        f.write(str(rc))


def run_ranks(argv: list, out_dir, world: int = 2) -> tuple[list, list]:
    """``cli.main(argv)`` on ``world`` gloo ranks (forked: the workers inherit the imported modules,
    where torchrun would import torch and diffusers again in each). Returns (exit codes, logs)."""
    import torch.multiprocessing as mp

    mp.start_processes(_rank, args=(world, _free_port(), argv, str(out_dir)), nprocs=world, join=True,
                       start_method="fork")
    return ([int((out_dir / f"rc{r}").read_text()) for r in range(world)],
            [(out_dir / f"log{r}").read_text() for r in range(world)])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_share_the_jobs(tmp_path):
    """Two ranks as under torchrun --nproc-per-node 2, on the CPU (gloo): each pending job runs on
    exactly one rank, the finished one is skipped, one merged report, no rank's part left behind."""
    image = data_path("man.jpeg")
    perf = _performance(tmp_path / "take.safetensors")
    jobs = _jobs(tmp_path, [{"image": image, "expression": [perf], "out": f"{k}.mp4", "seed": i}
                            for i, k in enumerate("dab")])
    out = tmp_path / "o"
    out.mkdir()
    (out / "d.mp4").write_bytes(b"finished earlier")
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir()
    rcs, logs = run_ranks(["batch", jobs, "--out", str(out)] + FAST, logs_dir)
    assert rcs == [0, 0]
    report = json.loads((out / "batch_report.json").read_text())
    rows = report["jobs"]
    assert [(x["line"], x["status"]) for x in rows] == [(1, "skipped"), (2, "done"), (3, "done")]
    assert sorted(x["rank"] for x in rows[1:]) == [0, 1]  # dealt out: each job on one rank
    assert ["1 to run here (rank 0 of 2)" in logs[0], "1 to run here (rank 1 of 2)" in logs[1]] == [True, True]
    for k in "ab":
        assert (out / f"{k}.mp4").stat().st_size > 0
    assert (out / "d.mp4").read_bytes() == b"finished earlier"
    assert sorted(os.listdir(out)) == sorted(["a.mp4", "a_faces.png", "b.mp4", "b_faces.png", "d.mp4",
                                              "batch_report.json"])

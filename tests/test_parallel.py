"""``--parallel cfg`` and ``--parallel sequence`` on two CPU processes (torch.distributed over gloo):
the latent equals the single-process one within fp32 round-off, with two characters (masked
portrait branch) and a shard boundary in the middle of a latent frame; the sharded portrait branch
equals the whole-sequence one slice by slice."""

import os
import socket

import pytest
import torch

from fantasyportrait_core.model.adapter import window_length
from fantasyportrait_core.model.attention import PortraitCondition, _branch, _shard_branch, projection_dtype
from fantasyportrait_core.faces.regions import token_person_ids
from fantasyportrait_core.runtime.parallel import ParallelRun, choose_mode
from fantasyportrait_core.validate import InputError

from .conftest import data_path

F_LAT, H, W = 3, 4, 4  # 9 frames of 32x32 px: 3 latent frames of 2x2 = 4 tokens; 12 tokens, 6 per rank


def _problem(seed: int = 0):
    """Tiny fp32 model, two-character portrait condition, text/image conditions with a negative
    prompt: cfg 2 and portrait cfg 3 make three guidance passes."""
    from fantasyportrait_core.model.attention import attach_portrait_processors
    from fantasyportrait_core.model.build import random_tiny_models
    from fantasyportrait_core.model.denoiser import I2VConditioning

    transformer, adapter, _, _ = random_tiny_models(seed)
    transformer, adapter = transformer.float(), adapter.float()
    state = attach_portrait_processors(transformer, adapter)
    g = torch.Generator().manual_seed(seed)
    lw = window_length()
    windows = torch.randn(1, F_LAT, 2 * lw, adapter.proj_dim, generator=g)
    latent_person = torch.zeros(F_LAT, (H // 2) * (W // 2), dtype=torch.long)
    latent_person[:, 0], latent_person[:, 1], latent_person[:, 3] = 1, 2, 2  # token 2 of each frame: background
    portrait = PortraitCondition(windows, token_person_ids(2, lw), latent_person)
    c = transformer.config
    y = torch.cat([torch.zeros(1, 4, F_LAT, H, W), torch.randn(1, 16, F_LAT, H, W, generator=g)], 1)
    y[:, :4, 0] = 1
    cond = I2VConditioning(torch.randn(1, 8, c.text_dim, generator=g), torch.randn(1, 8, c.text_dim, generator=g),
                           torch.randn(1, 257, c.image_dim, generator=g), y)
    return transformer, state, cond, portrait


def _latent(transformer, state, cond, portrait, batch_passes=None):
    from fantasyportrait_core.sampling import generate as P

    return P.generate_latent(transformer, state, cond, portrait, 9, W * 8, H * 8, steps=2, seed=1, cfg=2.0,
                             portrait_cfg=3.0, batch_passes=batch_passes)


def _worker(rank: int, world: int, port: int, out_dir: str):
    """One rank: the latent under cfg, then under sequence parallelism, saved for the parent."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        transformer, state, cond, portrait = _problem()
        state.parallel = ParallelRun("cfg", rank, world)
        cfg = _latent(transformer, state, cond, portrait)
        transformer, state, cond, portrait = _problem()
        run = ParallelRun("sequence", rank, world)
        run.enable_sequence(transformer)
        state.parallel = run
        seen = []
        transformer.blocks[0].attn2.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
        seq = _latent(transformer, state, cond, portrait)
        torch.save({"cfg": cfg, "sequence": seq, "tokens_seen": seen}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cfg_and_sequence_parallel_give_the_single_process_latent(tmp_path):
    import torch.multiprocessing as mp

    single = _latent(*_problem())
    # fork: the workers inherit the imported modules (spawn would import torch and diffusers again)
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        torch.testing.assert_close(r["cfg"], single, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(r["sequence"], single, rtol=1e-4, atol=1e-4)
        assert set(r["tokens_seen"]) == {F_LAT * (H // 2) * (W // 2) // 2}  # each rank held half the tokens
    assert torch.equal(ranks[0]["cfg"], ranks[1]["cfg"]) and torch.equal(ranks[0]["sequence"], ranks[1]["sequence"])
    assert single.abs().max() > 0.1


@pytest.mark.parametrize("rows", [1, 2])
def test_sharded_portrait_branch_is_the_whole_branch_sliced(tiny, rows):
    """Shards that start and end inside latent frames (6 tokens of 12, 5 of 15...): every token sees
    its own frame's window and person, exactly as in the whole sequence."""
    _, adapter, _, _ = tiny
    k_proj, v_proj = adapter.kv_projections(0)
    heads, head_dim = 2, adapter.dim // 2
    lw = window_length()
    for f_lat, s, world in ((3, 4, 2), (3, 5, 3), (2, 8, 4)):
        g = torch.Generator().manual_seed(f_lat * s)
        latent_person = torch.randint(0, 3, (f_lat, s), generator=g)
        cond = PortraitCondition(torch.randn(1, f_lat, 2 * lw, adapter.proj_dim, generator=g), token_person_ids(2, lw),
                                 latent_person)
        prep = cond.prepared("cpu", torch.float32, projection_dtype(k_proj, torch.float32), rows=rows)
        query = torch.randn(rows, f_lat * s, heads, head_dim, generator=g)
        with torch.no_grad():
            whole = _branch(query, prep, k_proj, v_proj)
            n = f_lat * s // world
            parts = [_shard_branch(query[:, r * n:(r + 1) * n], prep, k_proj, v_proj, r * n, f_lat * s)
                     for r in range(world)]
        torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-5, atol=1e-6)
        assert whole.abs().max() > 0


def test_auto_mode_and_refusals(capsys, monkeypatch):
    assert choose_mode("auto", 2, 2, 40) == "cfg" and choose_mode("auto", 3, 3, 40) == "cfg"
    assert choose_mode("auto", 2, 3, 40) == "sequence" and choose_mode("auto", 4, 2, 40) == "sequence"
    assert choose_mode("auto", 3, 2, 40) == "cfg"  # 40 heads cannot be split 3 ways
    # FlashPortrait's normalized block needs every token's statistics: never split the sequence
    assert choose_mode("auto", 4, 2, 40, whole_sequence=True) == "cfg"
    with pytest.raises(InputError, match="FlashPortrait's normalized expression block"):
        choose_mode("sequence", 2, 2, 40, whole_sequence=True)
    with pytest.raises(InputError, match="--nproc-per-node 2 or 4 or 5 or 8 or 10"):
        choose_mode("sequence", 3, 3, 40)
    run = ParallelRun("sequence", 0, 4)
    with pytest.raises(InputError, match="26 tokens"):
        run.check_tokens(26, "one forward")
    from fantasyportrait_core.cli import main

    rc = main(["run", "--tiny-random", "--image", "x.png", "--driving", "y.mp4", "--out", "z.mp4", "--parallel", "cfg"])
    assert rc == 2 and "torchrun --nproc-per-node N" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun without --parallel: every rank would render the same video
    rc = main(["run", "--tiny-random", "--image", "x.png", "--driving", "y.mp4", "--out", "z.mp4"])
    assert rc == 2 and "needs --parallel cfg|sequence|auto" in capsys.readouterr().err


def test_cli_run_parallel_sequence_writes_the_single_process_video_once(tmp_path, capfd):
    """``run --parallel sequence`` on 2 gloo ranks (the environment of torchrun --nproc-per-node 2):
    each rank's memory plan holds half the tokens, rank 0 alone writes, and the frames are those of
    the single-process run (same seed and model) up to round-off."""
    import numpy as np

    from fantasyportrait_core import cli
    from fantasyportrait_core.media.video import read_video

    from .test_batch import FAST, _performance, run_ranks

    perf = _performance(tmp_path / "take.safetensors")
    common = ["run", "--image", data_path("man.jpeg"), "--expression", perf] + FAST + ["--steps", "2"]
    argv = common + ["--out", str(tmp_path / "par.mp4"), "--parallel", "sequence"]
    rcs, logs = run_ranks(argv, tmp_path)
    assert rcs == [0, 0]
    out = capfd.readouterr()
    assert out.out.count('"output":') == 1 and "ParallelRun(sequence, rank 1 of 2)" in logs[1]
    assert all("(16 tokens," in text for text in logs)  # each rank's memory plan: half of the 32 tokens
    assert cli.main(common + ["--out", str(tmp_path / "one.mp4")]) == 0
    par, one = read_video(str(tmp_path / "par.mp4")).frames, read_video(str(tmp_path / "one.mp4")).frames
    assert par.shape == one.shape and len(par) == 5
    assert np.abs(par.astype(float) - one.astype(float)).mean() < 1.0
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".mp4")) == ["one.mp4", "par.mp4"]


def test_parallel_refuses_wan22_experts_before_any_work():
    from types import SimpleNamespace

    from fantasyportrait_core.runtime.parallel import setup_parallel

    models = SimpleNamespace(transformer=object(), transformer_2=object())
    with pytest.raises(InputError, match="does not split Wan2.2's two experts"):
        setup_parallel(models, "cfg", None, None)

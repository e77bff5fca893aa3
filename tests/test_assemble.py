"""One assembly of a loaded model's speed options for the CLI and the Model Loader node
(``runtime.assemble.set_speed_options``)."""

import copy
import logging

import torch

from fantasyportrait_core.model.attention import attach_portrait_processors
from fantasyportrait_core.model.fp8 import ScaledFP8Linear
from fantasyportrait_core.runtime import assemble


def _fp8_layers(model):
    return [m for m in model.modules() if isinstance(m, ScaledFP8Linear)]


def test_fast_mode_stores_bf16_weights_as_fp8_and_upcasts_off_fp8_gpus(tiny):
    transformer = copy.deepcopy(tiny[0])
    attach_portrait_processors(transformer, copy.deepcopy(tiny[1]))
    assert not _fp8_layers(transformer)
    speed = assemble.set_speed_options(transformer, torch.device("cpu"), "sdpa", fast=True)
    layers = _fp8_layers(transformer)
    assert layers and speed.storage == "fp8"
    # no fp8 tensor cores on the CPU: fp8 storage, matmuls upcast, and the notes say so
    assert speed.fp8_compute == "upcast" and {m.compute for m in layers} == {"upcast"}
    assert speed.notes[0] == "fp8 weights" and any("fp8 matmul unavailable" in n for n in speed.notes)
    assert not speed.compiled


def test_compile_is_skipped_with_the_reason_where_it_cannot_run(tiny, monkeypatch, caplog):
    transformer = copy.deepcopy(tiny[0])
    calls = []
    monkeypatch.setattr(type(transformer), "compile_repeated_blocks", lambda self, *a, **k: calls.append(1))
    monkeypatch.setattr(assemble.importlib.util, "find_spec", lambda name: None)  # no Triton
    with caplog.at_level(logging.WARNING, logger="FantasyPortrait"):
        speed = assemble.set_speed_options(transformer, torch.device("cuda"), compile=True)
    assert not calls and not speed.compiled and "not compiled (no Triton)" in speed.notes
    assert "needs Triton" in caplog.text
    speed = assemble.set_speed_options(transformer, torch.device("cpu"), compile=True)
    assert calls == [1] and speed.compiled and speed.storage == "bf16"


def test_the_loader_node_and_the_cli_assemble_alike(tiny, monkeypatch):
    """The node's build_portrait_model and the CLI's prepare_model both go through set_speed_options."""
    from fantasyportrait_core.runtime import runner
    from fantasyportrait_core.runtime.job import Job
    from nodes import loaders

    seen = []
    real = assemble.set_speed_options

    def spy(transformer, device, attention="sdpa", fast=False, compile=False):
        seen.append((attention, fast, compile))
        return real(transformer, device, attention, fast=fast, compile=compile)

    monkeypatch.setattr(assemble, "set_speed_options", spy)
    monkeypatch.setattr(loaders, "set_speed_options", spy)
    model = loaders.build_portrait_model(copy.deepcopy(tiny[0]), copy.deepcopy(tiny[1]), torch.float32,
                                         fast_mode="fp8 matmul")
    assert model.storage == "fp8" and model.fp8_compute == "upcast"
    models = runner.tiny_random_models(0)
    job = Job(image="x.png", driving=("d.mp4",), out="o.mp4")
    job.memory.fast = True
    runner.prepare_model(models, job, 64, 64, 5, 1)
    assert seen == [("sdpa", True, False), ("sdpa", True, False)]
    assert _fp8_layers(models.transformer)

"""Few-step and styled sampling through the nodes: LoRA node, sampler / preset / SIGMAS / denoise /
guidance interval inputs, GGUF in the model loader."""

import numpy as np
import pytest
import torch

from fantasyportrait_core.faces.face import Face, FaceTrack
from fantasyportrait_core.weights.lora_apply import active_loras
from fantasyportrait_core.drive.encode import DrivingExpression
from fantasyportrait_core.sampling.flow import PRESETS
from nodes.portrait import PortraitInputs

from . import checkpoint_writers as W
from .test_nodes import _conditioning, run


def _portrait(frames=5, seed=0):
    """FP_PORTRAIT of one character with seeded expression features (face detection and the expression
    encoder are covered by test_nodes.py; here only sampling matters)."""
    g = torch.Generator().manual_seed(seed)
    box = np.array([20.0, 16.0, 44.0, 44.0])
    lm = np.array([[27, 26], [37, 26], [32, 32], [28, 38], [36, 38]], dtype=float)
    track = FaceTrack(np.tile(box, (frames, 1)), np.tile(lm, (frames, 1, 1)), np.ones(frames, bool))
    driver = DrivingExpression(torch.randn(frames, 554, generator=g), track)
    return PortraitInputs([Face(box, lm, 0.99)], [driver], 64, 64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny):
    transformer, adapter, _, encoder = tiny
    d = tmp_path_factory.mktemp("fast")
    wan = W.write_wan_original(transformer, str(d / "wan.safetensors"))
    ad = W.write_adapter_repacked(adapter, str(d / "fp.safetensors"), encoder)
    (model,) = run("FantasyPortraitWanModelLoader", transformer=wan, adapter=ad, weight_dtype="fp32", storage="same",
                   offload="none")
    portrait = _portrait()
    pos, neg = _conditioning(model, 2, 8, 8)
    loras = {name: W.write_wan_lora(model.transformer, str(d / f"{name}.safetensors"), layout=layout, seed=seed,
                                    lightx2v=name == "lightx2v")
             for name, layout, seed in (("lightx2v", "diffusion_model", 1), ("style", "lora_unet", 2))}
    return dict(model=model, portrait=portrait, pos=pos, neg=neg, dir=d, loras=loras)


def _sample(s, **kw):
    args = dict(model=s["model"], portrait=s["portrait"], positive=s["pos"], negative=s["neg"],
                latent={"samples": torch.zeros(1, 16, 2, 8, 8)}, seed=5, steps=2, cfg=1.0, portrait_cfg=3.0, shift=5.0,
                context_frames=81, context_overlap=16)
    args.update(kw)
    return run("FantasyPortraitSampler", **args)[0]["samples"]


def test_lora_nodes_chain_and_the_sampler_applies_exactly_them(setup):
    s = setup
    base = s["model"]
    before = {k: v.clone() for k, v in base.transformer.state_dict().items()}
    plain = _sample(s)
    (one,) = run("FantasyPortraitLoRA", model=base, lora_name=str(s["dir"] / "lightx2v.safetensors"), strength=1.0)
    (two,) = run("FantasyPortraitLoRA", model=one, lora_name=str(s["dir"] / "style.safetensors"), strength=0.5)
    assert base.loras == () and len(one.loras) == 1 and [w for _, w in two.loras] == [1.0, 0.5]
    assert run("FantasyPortraitLoRA", model=base, lora_name="unused.safetensors", strength=0.0)[0] is base

    styled = _sample(s, model=two)
    assert active_loras(base.transformer) == [(w.key, st) for w, st in two.loras]
    assert not torch.allclose(styled, plain)
    assert torch.equal(_sample(s, model=two), styled), "same LoRAs, same seed, same result"
    # a later prompt without LoRAs gets the untouched model back
    assert torch.equal(_sample(s), plain)
    after = base.transformer.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_lora_node_reports_a_missing_file(setup):
    with pytest.raises(FileNotFoundError, match="loras"):
        run("FantasyPortraitLoRA", model=setup["model"], lora_name="nope.safetensors", strength=1.0)


def test_preset_equals_its_explicit_sigmas_and_sampler(setup, monkeypatch):
    import nodes.host as host

    totals = []
    real = host.Progress.__init__
    monkeypatch.setattr(host.Progress, "__init__", lambda self, total: totals.append(total) or real(self, total))
    by_preset = _sample(setup, preset="lightx2v", cfg=4.0)  # the preset forces cfg 1
    assert totals == [4]
    explicit = _sample(setup, sampler="lcm", sigmas=torch.tensor(PRESETS["lightx2v"].sigmas), cfg=1.0)
    assert torch.equal(by_preset, explicit)
    assert not torch.equal(by_preset, _sample(setup, sampler="euler", sigmas=torch.tensor(PRESETS["lightx2v"].sigmas)))


def test_each_sampler_runs_and_the_sde_noise_is_seeded(setup):
    euler = _sample(setup)
    for sampler in ("unipc", "dpmpp_2m", "dpmpp_2m_sde"):
        a = _sample(setup, sampler=sampler, steps=3)
        assert torch.isfinite(a).all() and not torch.equal(a, euler), sampler
    assert torch.equal(a, _sample(setup, sampler="dpmpp_2m_sde", steps=3))


def test_denoise_keeps_part_of_the_input_latent(setup):
    g = torch.Generator().manual_seed(3)
    content = {"samples": torch.randn(1, 16, 2, 8, 8, generator=g)}
    low = _sample(setup, latent=content, denoise=0.3)
    high = _sample(setup, latent=content, denoise=1.0)
    assert not torch.equal(low, high)
    # at low denoise the result stays closer to the input
    assert (low - content["samples"]).norm() < (high - content["samples"]).norm()


def test_guidance_interval_inputs(setup):
    full = _sample(setup, portrait_cfg=3.0)
    early = _sample(setup, portrait_cfg=3.0, portrait_cfg_start=0.0, portrait_cfg_end=0.5)
    off = _sample(setup, portrait_cfg=1.0)
    assert not torch.equal(full, early) and not torch.equal(early, off)
    # a range covering every step is the same as no range
    assert torch.equal(_sample(setup, portrait_cfg=3.0, portrait_cfg_start=0.0, portrait_cfg_end=1.0), full)
    assert not torch.equal(_sample(setup, portrait_scale_steps="0.5-1:0.2"), full)
    with pytest.raises(ValueError, match="portrait_scale_steps"):
        _sample(setup, portrait_scale_steps="late:0.2")
    with pytest.raises(ValueError, match="portrait cfg range"):
        _sample(setup, portrait_cfg_start=0.8, portrait_cfg_end=0.2)
    with pytest.raises(ValueError, match="strictly decreasing"):
        _sample(setup, sigmas=torch.tensor([1.0, 0.5, 0.7, 0.0]))


def test_model_loader_takes_gguf(tmp_path, tiny):
    from diffusers.quantizers.gguf.utils import GGUFLinear

    from fantasyportrait_core.model.build import TINY_ADAPTER, TINY_TRANSFORMER, build_adapter, build_transformer

    cfg = dict(TINY_TRANSFORMER, **W.GGUF_TINY)
    torch.manual_seed(0)
    path = str(tmp_path / "wan2.1-i2v-14b-480p-Q8_0.gguf")
    W.write_wan_gguf(build_transformer(cfg).eval(), path)
    ad = W.write_adapter_repacked(build_adapter(cfg, **TINY_ADAPTER), str(tmp_path / "fp.safetensors"))
    (model,) = run("FantasyPortraitWanModelLoader", transformer=path, adapter=ad, weight_dtype="bf16", storage="same",
                   offload="none")
    assert isinstance(model.transformer.blocks[0].attn1.to_k, GGUFLinear)
    with pytest.raises(ValueError, match="storage to 'same'"):
        run("FantasyPortraitWanModelLoader", transformer=path, adapter=ad, weight_dtype="bf16", storage="fp8_e4m3fn",
            offload="none")


def test_fast_workflow_is_consistent_with_the_nodes():
    import json
    import os

    from .conftest import ROOT
    from .test_nodes import MAPPINGS, NATIVE, _widget_count

    with open(os.path.join(ROOT, "workflows", "fantasyportrait_fast.json")) as f:
        wf = json.load(f)
    types = {n["type"] for n in wf["nodes"]}
    assert "FantasyPortraitLoRA" in types and types - set(MAPPINGS) <= NATIVE
    nodes_by_id = {n["id"]: n for n in wf["nodes"]}
    for n in wf["nodes"]:
        if n["type"] in MAPPINGS:
            assert len(n["widgets_values"]) == _widget_count(MAPPINGS[n["type"]].INPUT_TYPES()), n["type"]
    sampler = next(n for n in wf["nodes"] if n["type"] == "FantasyPortraitSampler")
    lora = next(n for n in wf["nodes"] if n["type"] == "FantasyPortraitLoRA")
    assert sampler["widgets_values"][9] == "lightx2v" and sampler["widgets_values"][3] == 1.0  # preset, cfg 1
    src = next(l for l in wf["links"] if l[3] == sampler["id"] and l[4] == 0)
    assert nodes_by_id[src[1]] is lora, "the sampler's model comes through the LoRA node"
    assert len({l[0] for l in wf["links"]}) == len(wf["links"])

"""Wan2.2-I2V-A14B through the pack's own nodes (experimental): Model Loader with transformer_2, the
Sampler's boundary / adapter_on, the same latent as the core sampler with both experts; one-line errors."""

import pytest
import torch

from fantasyportrait_core.drive.condition import portrait_condition
from fantasyportrait_core.model.attention import attach_portrait_processors
from fantasyportrait_core.model.denoiser import I2VConditioning
from fantasyportrait_core.runtime.job import SamplingOptions
from fantasyportrait_core.sampling.experts import Expert, ExpertPair
from fantasyportrait_core.sampling.generate import generate_latent
from fantasyportrait_core.validate import InputError
from fantasyportrait_core.weights.files import CheckpointError
from fantasyportrait_core.weights.keys import COMFY_PREFIX
from fantasyportrait_core.weights.experts import load_wan22_experts
from fantasyportrait_core.weights.load import load_adapter
from nodes.sampler import conditioning_parts, portrait_layout

from . import checkpoint_writers as W
from .test_nodes import run
from .test_nodes_fast import _portrait
from .test_wan22_sampling import tiny_wan22


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("wan22nodes")
    high, low, adapter = tiny_wan22(11)
    return dict(high=W.write_wan_original(high, str(d / "wan2.2_i2v_high_noise_14B_fp16.safetensors"),
                                          dtype=torch.float32, prefix=COMFY_PREFIX),
                low=W.write_wan_original(low, str(d / "wan2.2_i2v_low_noise_14B_fp16.safetensors"),
                                         dtype=torch.float32, prefix=COMFY_PREFIX),
                adapter=W.write_adapter_repacked(adapter, str(d / "fp.safetensors"), tiny[3], dtype=torch.float32),
                wan21=W.write_wan_original(tiny[0], str(d / "wan2.1_i2v_480p.safetensors")))


def _conditioning(f_lat=2, h=8, w=8):
    g = torch.Generator().manual_seed(4)
    mask = torch.ones(1, 1, f_lat, h, w)
    mask[:, :, 0] = 0.0
    extra = {"concat_latent_image": torch.randn(1, 16, f_lat, h, w, generator=g), "concat_mask": mask}
    return ([[torch.randn(1, 512, 32, generator=g), dict(extra)]], [[torch.randn(1, 512, 32, generator=g), dict(extra)]])


def _loader(files, **kw):
    args = dict(transformer=files["high"], adapter=files["adapter"], weight_dtype="fp32", storage="same",
                offload="none", transformer_2=files["low"])
    args.update(kw)
    return run("FantasyPortraitWanModelLoader", **args)[0]


def test_node_sampler_with_two_experts_equals_the_core_sampler(files):
    model = _loader(files)
    assert model.low_noise is not None and "EXPERIMENTAL" in model.info
    portrait = _portrait()
    pos, neg = _conditioning()  # Wan2.2 I2V: no CLIP vision output
    kw = dict(model=model, portrait=portrait, positive=pos, negative=neg, latent={"samples": torch.zeros(1, 16, 2, 8, 8)},
              seed=5, steps=6, cfg=2.0, portrait_cfg=3.0, shift=5.0, context_frames=81, context_overlap=16)
    out, info = run("FantasyPortraitSampler", **kw, adapter_on="high")
    assert "EXPERIMENTAL" in info and "adapter on high" in info
    # the core sampler with both experts loaded by the core loader, the same conditions
    high, low = load_wan22_experts(files["high"], files["low"], dtype=torch.float32)  # heads as the node infers
    adapter = load_adapter(files["adapter"], dtype=torch.float32)
    pair = ExpertPair(Expert("high", high, attach_portrait_processors(high, adapter)),
                      Expert("low", low, attach_portrait_processors(low, adapter)), adapter_on="high")
    text_pos, text_neg, image_ctx, y = conditioning_parts(pos, neg, 2.0, clip_required=False)
    assert image_ctx is None
    layout = portrait_layout(portrait, 64, 64, 5)
    cond = portrait_condition(adapter, portrait.drivers, 5, layout, portrait.scale)
    resolved = SamplingOptions(steps=6, cfg=2.0, portrait_cfg=3.0, shift=5.0, seed=5).resolve()
    ours = generate_latent(None, None, I2VConditioning(text_pos, text_neg, None, y), cond, 5, 64, 64, seed=5, device="cpu",
                           resolved=resolved, experts=pair)
    from fantasyportrait_core.model.build import denormalize_latent

    torch.testing.assert_close(out["samples"], denormalize_latent(ours), rtol=1e-5, atol=1e-5)
    assert {n for _, n in pair.trace} == {"high", "low"}
    both, _ = run("FantasyPortraitSampler", **kw)  # adapter_on both (default): the low expert's portrait counts
    assert not torch.allclose(both["samples"], out["samples"])
    with pytest.raises(InputError, match="boundary must be between 0 and 1"):
        run("FantasyPortraitSampler", **kw, boundary=1.0)


def test_loader_one_line_errors(files):
    with pytest.raises(CheckpointError, match="one Wan2.2-I2V-A14B expert"):
        _loader(files, transformer_2="none")  # a single expert where Wan2.1 is expected
    with pytest.raises(CheckpointError, match="Wan2.1-I2V transformer .CLIP image branch., not a Wan2.2"):
        _loader(files, transformer_2=files["wan21"])
    with pytest.raises(CheckpointError, match="swapped"):
        _loader(files, transformer=files["low"], transformer_2=files["high"])

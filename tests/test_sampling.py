import copy

import numpy as np
import pytest
import torch

from fantasyportrait_core.model.attention import PortraitCondition, attach_portrait_processors
from fantasyportrait_core.model.denoiser import I2VConditioning, PortraitDenoiser, first_frame_mask, pad_text
from fantasyportrait_core.sampling.flow import flow_sigmas, initial_noise, sample_euler
from fantasyportrait_core.sampling.guidance import combine_guidance, guidance_passes


def test_sigmas_match_reference_scheduler():
    # diffsynth FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True).set_timesteps(30)
    s = np.linspace(1.0, 0.0, 31)[:-1]
    ref = 5 * s / (1 + 4 * s)
    ours = flow_sigmas(30, 5.0)
    assert ours.shape == (31,) and ours[-1] == 0
    np.testing.assert_allclose(ours[:-1].numpy(), ref, rtol=1e-6)
    assert (ours[1:] < ours[:-1]).all()
    with pytest.raises(ValueError):
        flow_sigmas(0)


def test_dual_guidance_formula():
    g = torch.Generator().manual_seed(1)
    vp, vpos, vneg = (torch.randn(4, generator=g) for _ in range(3))
    torch.testing.assert_close(combine_guidance(vp, vpos, vneg, 5.0, 4.0), vneg + 5 * (vpos - vneg) + 4 * (vp - vpos))
    torch.testing.assert_close(combine_guidance(vp, vpos, None, 1.0, 4.0), vpos + 4 * (vp - vpos))
    torch.testing.assert_close(combine_guidance(vp, None, vneg, 5.0, 1.0), vneg + 5 * (vp - vneg))
    torch.testing.assert_close(combine_guidance(vp, None, None, 1.0, 1.0), vp)
    with pytest.raises(ValueError):
        combine_guidance(vp, None, None, 5.0, 4.0)


def test_guidance_pass_counts():
    assert len(guidance_passes(5.0, 4.0)) == 3
    assert len(guidance_passes(1.0, 4.0)) == 2
    assert guidance_passes(1.0, 1.0) == [("positive", True)]
    assert guidance_passes(5.0, 1.0) == [("positive", True), ("negative", True)]


def test_euler_reaches_constant_x0_exactly():
    """With a perfect denoiser for a single target, the flow ODE ends at the target."""
    target = torch.randn(1, 4, 2, 3, 3)
    x = initial_noise(target.shape, seed=3) * 1.0
    out = sample_euler(lambda x, sigma: target, x, flow_sigmas(7, 5.0))
    torch.testing.assert_close(out, target, rtol=1e-5, atol=1e-5)


def test_callback_can_interrupt_and_sees_every_step():
    seen = []

    class Stop(Exception):
        pass

    def cb(info):
        seen.append(info.i)
        if info.i == 2:
            raise Stop

    with pytest.raises(Stop):
        sample_euler(lambda x, s: x * 0, torch.ones(2), flow_sigmas(10), callback=cb)
    assert seen == [0, 1, 2]


def test_text_padding_and_first_frame_mask():
    t = pad_text(torch.ones(1, 7, 3))
    assert t.shape == (1, 512, 3) and t[:, 7:].abs().sum() == 0
    with pytest.raises(ValueError):
        pad_text(torch.ones(1, 513, 3))
    m = first_frame_mask(3, 2, 2)
    assert m.shape == (1, 4, 3, 2, 2) and m[:, :, 0].min() == 1 and m[:, :, 1:].max() == 0


def _denoiser(tiny, seed_ctx=0, cfg=5.0, pcfg=4.0):
    import copy

    transformer, adapter, _, _ = tiny
    model = copy.deepcopy(transformer)
    state = attach_portrait_processors(model, adapter)
    g = torch.Generator().manual_seed(seed_ctx)
    c = model.config
    cond = I2VConditioning(torch.randn(1, 9, c.text_dim, generator=g), torch.randn(1, 9, c.text_dim, generator=g),
                           torch.randn(1, 257, c.image_dim, generator=g), torch.randn(1, 20, 2, 4, 4, generator=g))
    portrait = PortraitCondition(torch.randn(1, 2, 97, adapter.proj_dim, generator=g))
    return PortraitDenoiser(model, state, cond, portrait, cfg=cfg, portrait_cfg=pcfg)


def test_sampler_deterministic_for_seed(tiny):
    den = _denoiser(tiny)
    sig = flow_sigmas(3)
    run = lambda seed: sample_euler(den, initial_noise((1, 16, 2, 4, 4), seed), sig)
    a, b, c = run(42), run(42), run(43)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_denoiser_combines_three_passes(tiny):
    den = _denoiser(tiny, cfg=5.0, pcfg=4.0)
    x = torch.randn(1, 16, 2, 4, 4)
    sigma = 0.6
    vp = den.velocity(x, sigma, "positive", True)
    vpos = den.velocity(x, sigma, "positive", False)
    vneg = den.velocity(x, sigma, "negative", False)
    expected = x - sigma * (vneg + 5 * (vpos - vneg) + 4 * (vp - vpos))
    torch.testing.assert_close(den(x, sigma), expected)
    assert not torch.allclose(vp, vpos), "portrait branch must change the prediction"
    assert den.state.condition is None, "no condition is left behind after a pass"


@pytest.mark.parametrize("storage", [None, torch.float8_e4m3fn])
def test_bf16_model_denoises_like_fp32(tmp_path, tiny, storage):
    """bf16 weights (diffusers keeps some modules fp32) and scaled fp8 storage run a 3-pass guided
    step and stay close to the fp32 model on the same inputs."""
    from fantasyportrait_core.weights.load import load_transformer

    from . import checkpoint_writers as W

    transformer, adapter, _, _ = tiny
    path = W.write_wan_original(transformer, str(tmp_path / "wan.safetensors"))
    g = torch.Generator().manual_seed(0)
    c = transformer.config
    cond = I2VConditioning(torch.randn(1, 9, c.text_dim, generator=g), torch.randn(1, 9, c.text_dim, generator=g),
                           torch.randn(1, 257, c.image_dim, generator=g), torch.randn(1, 20, 2, 4, 4, generator=g))
    portrait = PortraitCondition(torch.randn(1, 2, 97, adapter.proj_dim, generator=g))
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    outs = {}
    for name, dtype, st in (("fp32", torch.float32, None), ("low", torch.bfloat16, storage)):
        model = load_transformer(path, dtype=dtype, storage_dtype=st, num_heads=2)
        state = attach_portrait_processors(model, copy.deepcopy(adapter).to(dtype))
        outs[name] = PortraitDenoiser(model, state, cond, portrait, cfg=3.0, portrait_cfg=4.0)(x, 0.5)
    assert outs["low"].dtype == torch.float32 and torch.isfinite(outs["low"]).all()
    err = (outs["low"] - outs["fp32"]).norm() / outs["fp32"].norm()
    assert err < (0.05 if storage is None else 0.1), err


def test_portrait_cfg_at_or_below_one_is_off_as_in_reference(tiny):
    """Reference ``WanVideoPipeline.__call__`` runs portrait guidance only for ``portrait_cfg > 1``;
    0.5 must give the same passes and the same prediction as 1 (no extrapolation)."""
    x = torch.randn(1, 16, 2, 4, 4)
    for cfg in (1.0, 5.0):
        assert guidance_passes(cfg, 0.5) == guidance_passes(cfg, 1.0) == guidance_passes(cfg, 0.0)
        at_one, below = _denoiser(tiny, cfg=cfg, pcfg=1.0), _denoiser(tiny, cfg=cfg, pcfg=0.5)
        torch.testing.assert_close(below(x, 0.6), at_one(x, 0.6), rtol=0, atol=0)
    assert len(guidance_passes(1.0, 1.01)) == 2, "just above 1 portrait guidance is on"

"""Samplers, explicit schedules, presets, denoise and the guidance interval.

Convergence is checked on a flow-matching problem with a known exact solution: data
``x0 ~ N(mu, s²)`` per element under ``x_σ = (1 − σ)·x0 + σ·ε``. The exact x0-predictor is
``E[x0 | x_σ] = mu + (1 − σ)s²/((1 − σ)²s² + σ²)·(x_σ − (1 − σ)mu)`` and the probability-flow ODE
keeps ``(x_σ − (1 − σ)mu)/sqrt((1 − σ)²s² + σ²)`` constant, so starting from pure noise ε at σ = 1
it ends exactly at ``mu + s·ε``.
"""

import copy

import pytest
import torch

from fantasyportrait_core.model.attention import PortraitCondition, attach_portrait_processors
from fantasyportrait_core.model.denoiser import I2VConditioning, PortraitDenoiser
from fantasyportrait_core.sampling.flow import (PRESETS, SAMPLERS, check_sigmas, flow_sigmas, sample, schedule_sigmas,
                                                start_latent, timestep_sigmas)
from fantasyportrait_core.sampling.guidance import GuidanceSchedule, parse_step_ranges

MU, S = 0.5, 0.5


def exact_x0(x, sigma):
    var = (1 - sigma) ** 2 * S * S + sigma * sigma
    return MU + (1 - sigma) * S * S / var * (x - (1 - sigma) * MU)


@pytest.fixture(scope="module")
def gaussian():
    noise = torch.randn(1, 20000, generator=torch.Generator().manual_seed(0))
    return noise, MU + S * noise


def rms_error(sampler, steps, gaussian, shift=1.0):
    noise, exact = gaussian
    sigmas = flow_sigmas(steps, shift)
    out = sample(exact_x0, noise.clone(), sigmas, sampler, seed=1)
    return (out - exact).pow(2).mean().sqrt().item(), out


def test_deterministic_samplers_converge_to_the_exact_ode_solution(gaussian):
    err = {(k, n): rms_error(k, n, gaussian)[0] for k in ("euler", "unipc", "dpmpp_2m") for n in (8, 16, 32)}
    # Euler is first order: halving the step halves the error; 32 uniform steps land within 0.03.
    assert err["euler", 32] < 0.03
    assert 1.7 < err["euler", 16] / err["euler", 32] < 2.3
    for k in ("unipc", "dpmpp_2m"):
        assert err[k, 32] < 0.005, (k, err[k, 32])
        assert err[k, 32] < err[k, 16] < err[k, 8]
        for n in (8, 16, 32):  # higher order: at least 4x more accurate per step than Euler
            assert err[k, n] < err["euler", n] / 4, (k, n, err[k, n], err["euler", n])


def test_higher_order_also_wins_with_the_wan_shift(gaussian):
    for k in ("unipc", "dpmpp_2m"):
        assert rms_error(k, 32, gaussian, shift=3.0)[0] < rms_error("euler", 32, gaussian, shift=3.0)[0] / 10


def test_sde_sampler_reaches_the_data_distribution(gaussian):
    """DPM++ 2M SDE follows a different (stochastic) path, so it is checked in distribution."""
    _, out = rms_error("dpmpp_2m_sde", 32, gaussian)
    assert abs(out.mean().item() - MU) < 0.02
    assert abs(out.std().item() - S) < 0.04
    _, again = rms_error("dpmpp_2m_sde", 32, gaussian)
    assert torch.equal(out, again), "the SDE noise is seeded"


def test_multistep_samplers_call_the_model_at_the_schedule_sigmas():
    sigmas = timestep_sigmas([1000, 750, 500, 250], 5.0)
    for sampler in SAMPLERS:
        seen = []
        sample(lambda x, s: seen.append(s) or x * 0.5, torch.randn(1, 4, 8), sigmas, sampler, seed=0)
        assert seen == pytest.approx(sigmas[:-1].tolist(), abs=1e-7), sampler


def test_lcm_is_x0_then_fresh_noise():
    """lightx2v step-distill rule: x <- (1 - s_next)·x0 + s_next·eps; the last step returns x0."""
    target = torch.full((1, 3, 5), 0.25)
    sigmas = torch.tensor([1.0, 0.6, 0.0])
    steps = []
    out = sample(lambda x, s: target, torch.randn(1, 3, 5), sigmas, "lcm", seed=7, callback=steps.append)
    assert torch.equal(out, target)
    eps = torch.randn((1, 3, 5), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(steps[0].x, 0.4 * target + 0.6 * eps)
    assert [s.i for s in steps] == [0, 1]


def test_unknown_sampler_is_named():
    with pytest.raises(ValueError, match="unknown sampler 'heun'.*euler"):
        sample(lambda x, s: x, torch.zeros(1, 1, 1), flow_sigmas(2), "heun")


def test_lightx2v_preset_follows_its_published_config():
    # 1000 training sigmas 1 - k/1000, shifted by 5, picked at k = 1000 - t for t in 1000/750/500/250.
    s = torch.tensor([1.0, 0.75, 0.5, 0.25])
    expected = (5 * s / (1 + 4 * s)).tolist() + [0.0]
    preset = PRESETS["lightx2v"]
    assert preset.sampler == "lcm" and preset.cfg == 1.0
    assert list(preset.sigmas) == pytest.approx(expected, abs=1e-7)
    assert schedule_sigmas(30, 5.0, preset="lightx2v").tolist() == pytest.approx(expected, abs=1e-7)
    assert expected[:4] == pytest.approx([1.0, 0.9375, 0.833333, 0.625], abs=1e-5)


def test_explicit_sigmas_win_and_are_checked():
    torch.testing.assert_close(schedule_sigmas(30, 5.0, sigmas=[1.0, 0.5, 0.0], preset="lightx2v"),
                               torch.tensor([1.0, 0.5, 0.0]))
    for bad, msg in (([1.0], "at least 2"), ([1.0, 0.5, 0.6], "strictly decreasing"), ([14.6, 7.0, 0.0], r"\[0, 1\]"),
                     ([1.0, float("nan")], "non-finite")):
        with pytest.raises(ValueError, match=msg):
            check_sigmas(bad)
    with pytest.raises(ValueError, match="denoise"):
        schedule_sigmas(4, 5.0, denoise=0.5, preset="lightx2v")
    with pytest.raises(ValueError, match="unknown preset"):
        schedule_sigmas(4, preset="turbo")


def test_denoise_starts_from_the_given_latent():
    sigmas = schedule_sigmas(10, 5.0, denoise=0.5)
    first = 5 * 0.5 / (1 + 4 * 0.5)
    assert float(sigmas[0]) == pytest.approx(first) and len(sigmas) == 11
    init, noise = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 16, 2, 4, 4)
    torch.testing.assert_close(start_latent(noise, first, init), (1 - first) * init + first * noise)
    torch.testing.assert_close(start_latent(noise, 1.0), noise)
    with pytest.raises(ValueError, match="starting latent"):
        start_latent(noise, first)


def test_step_ranges_parse_and_reject():
    assert parse_step_ranges("0-0.5:1.2, 0.5-1:0.8") == ((0.0, 0.5, 1.2), (0.5, 1.0, 0.8))
    assert parse_step_ranges("  ") == ()
    with pytest.raises(ValueError, match="portrait_scale_steps.*start-end:value"):
        parse_step_ranges("0.5:1")
    with pytest.raises(ValueError, match="0 <= start < end <= 1"):
        parse_step_ranges("0.6-0.2:1")


def test_guidance_interval_switches_scales_and_passes_per_step():
    g = GuidanceSchedule(flow_sigmas(4, 5.0), cfg=5.0, portrait_cfg=4.0, cfg_range=(0.0, 0.5),
                         portrait_cfg_range=(0.25, 1.0), portrait_scales=((0.75, 1.0, 0.3),))
    steps = [g.at_step(i) for i in range(4)]
    assert [(s.cfg, s.portrait_cfg) for s in steps] == [(5.0, 1.0), (5.0, 4.0), (1.0, 4.0), (1.0, 4.0)]
    assert [len(s.passes) for s in steps] == [2, 3, 2, 2]
    assert [s.portrait_scale for s in steps] == [None, None, None, 0.3]
    assert g.at(float(flow_sigmas(4, 5.0)[2])) == steps[2]
    assert g.uses_negative()
    with pytest.raises(ValueError, match="cfg range"):
        GuidanceSchedule(flow_sigmas(4), cfg_range=(0.5, 0.5))


def _tiny_denoiser(tiny, scale=1.0, **kw):
    transformer, adapter, _, _ = tiny
    model = copy.deepcopy(transformer)
    state = attach_portrait_processors(model, adapter)
    g = torch.Generator().manual_seed(0)
    c = model.config
    cond = I2VConditioning(torch.randn(1, 9, c.text_dim, generator=g), torch.randn(1, 9, c.text_dim, generator=g),
                           torch.randn(1, 257, c.image_dim, generator=g), torch.randn(1, 20, 2, 4, 4, generator=g))
    portrait = PortraitCondition(torch.randn(1, 2, 97, adapter.proj_dim, generator=g), scale=scale)
    return PortraitDenoiser(model, state, cond, portrait, **kw)


def test_denoiser_applies_the_guidance_of_each_step(tiny):
    """Inside its range a step equals the fixed-scale denoiser; outside, the unguided one."""
    sigmas = flow_sigmas(4, 5.0)
    sched = GuidanceSchedule(sigmas, cfg=5.0, portrait_cfg=4.0, cfg_range=(0.0, 0.5), portrait_cfg_range=(0.0, 0.75),
                             portrait_scales=((0.5, 1.0, 0.4),))
    ranged = _tiny_denoiser(tiny, cfg=5.0, portrait_cfg=4.0, guidance=sched)
    x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    expect = {0: dict(cfg=5.0, portrait_cfg=4.0, scale=1.0), 2: dict(cfg=1.0, portrait_cfg=4.0, scale=0.4),
              3: dict(cfg=1.0, portrait_cfg=1.0, scale=0.4)}
    for i, e in expect.items():
        fixed = _tiny_denoiser(tiny, scale=e["scale"], cfg=e["cfg"], portrait_cfg=e["portrait_cfg"])
        torch.testing.assert_close(ranged(x, float(sigmas[i])), fixed(x, float(sigmas[i])), rtol=0, atol=0)
    assert ranged.portrait.scale == 0.4 and ranged(x, float(sigmas[0])) is not None and ranged.portrait.scale == 1.0

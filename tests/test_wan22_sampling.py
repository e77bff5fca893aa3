"""Wan2.2-I2V-A14B on our sampler (experimental): the portrait branch in cross-attention without the
image branch, the expert switch at the boundary (which expert ran at which sigma), one expert on the
device at a time, adapter_on, and 2+ characters with masks as on Wan2.1."""

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from fantasyportrait_core.faces.regions import token_person_ids
from fantasyportrait_core.model.adapter import window_length
from fantasyportrait_core.model.attention import PortraitCondition, attach_portrait_processors, portrait_branch
from fantasyportrait_core.model.build import TINY_ADAPTER, TINY_WAN22_EXPERT, build_adapter, build_transformer
from fantasyportrait_core.model.denoiser import I2VConditioning, first_frame_mask
from fantasyportrait_core.runtime.job import SamplingOptions
from fantasyportrait_core.sampling.experts import Expert, ExpertPair, check_expert_options
from fantasyportrait_core.sampling.generate import generate_latent


def tiny_wan22(seed: int):
    """(high, low, adapter): two tiny Wan2.2 experts and an adapter whose K/V move the output."""
    torch.manual_seed(seed)
    high, low = build_transformer(TINY_WAN22_EXPERT).eval(), build_transformer(TINY_WAN22_EXPERT).eval()
    adapter = build_adapter(TINY_WAN22_EXPERT, **TINY_ADAPTER).eval()
    for block in adapter.ip_adapter.blocks:
        for lin in (block.cross_attn.ip_adapter_single_stream_k_proj, block.cross_attn.ip_adapter_single_stream_v_proj):
            torch.nn.init.normal_(lin.weight, std=0.2)
    return high, low, adapter


@pytest.fixture(scope="module")
def wan22():
    return tiny_wan22(7)


def _two_people(f_lat, s, proj, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = window_length()
    latent_person = torch.tensor(([0, 1, 1, 2] * (s // 4 + 1))[:s]).repeat(f_lat, 1)
    return PortraitCondition(torch.randn(1, f_lat, 2 * w, proj, generator=g), token_person_ids(2, w), latent_person)


def test_portrait_branch_on_an_expert_cross_attention_without_image_branch(wan22):
    """No image branch: the whole context is text (nothing split off the front); the portrait
    processor = diffusers' own processor + to_out(scale · branch); each person sees only its tokens."""
    high, _, adapter = wan22
    attn = high.blocks[0].attn2
    assert attn.add_k_proj is None
    f_lat, s = 2, 8
    hidden = torch.randn(1, f_lat * s, 24)
    context = torch.randn(1, 512, 24)  # 512 text tokens only: a 257-token split would change the result
    plain = WanAttnProcessor()(attn, hidden, context)
    state = attach_portrait_processors(high, adapter)
    try:
        cond = _two_people(f_lat, s, TINY_ADAPTER["proj_dim"])
        cond.scale = 0.7
        state.condition = cond
        with torch.no_grad():
            out = attn.processor(attn, hidden, context)
            q = attn.norm_q(attn.to_q(hidden)).unflatten(2, (attn.heads, -1))
            k, v = adapter.kv_projections(0)
            branch = portrait_branch(q, cond.windows, k, v, cond.latent_person, cond.token_person)
            expected = plain + 0.7 * branch @ attn.to_out[0].weight.T
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        # background tokens unchanged; person 1 independent of person 2's tokens
        ids = cond.latent_person.reshape(-1)
        torch.testing.assert_close(out[0, ids == 0], plain[0, ids == 0], rtol=1e-6, atol=1e-6)
        w = window_length()
        other = PortraitCondition(cond.windows.clone(), cond.token_person, cond.latent_person, 0.7)
        other.windows[:, :, w:] += 3.0
        state.condition = other
        with torch.no_grad():
            out2 = attn.processor(attn, hidden, context)
        torch.testing.assert_close(out2[0, ids == 1], out[0, ids == 1], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(out2[0, ids == 2], out[0, ids == 2])
    finally:
        state.condition = None
        for b in high.blocks:
            b.attn2.set_processor(WanAttnProcessor())


def _cond(f_lat=2, h=4, w=4):
    g = torch.Generator().manual_seed(1)
    y = torch.cat([first_frame_mask(f_lat, h, w), torch.randn(1, 16, f_lat, h, w, generator=g)], dim=1)
    return I2VConditioning(torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g), None, y)


def _pair(wan22, adapter_on="both", boundary=0.9, log=None):
    high, low, adapter = wan22
    experts = []
    for name, tr in (("high", high), ("low", low)):
        state = attach_portrait_processors(tr, adapter)
        experts.append(Expert(name, tr, state))
    pair = ExpertPair(experts[0], experts[1], boundary=boundary, adapter_on=adapter_on)
    if log is not None:  # record every forward (expert, timestep, portrait condition?) and every move
        for e in experts:
            def pre(module, args, kwargs, e=e):
                t = args[1] if len(args) > 1 else kwargs["timestep"]
                log.append(("forward", e.name, float(t[0]), e.state.condition is not None))

            e.transformer.register_forward_pre_hook(pre, with_kwargs=True)
            original = e.transformer.to

            def to(*a, e=e, original=original, **k):
                log.append(("to", e.name, str(a[0] if a else k.get("device"))))
                return original(*a, **k)

            e.transformer.to = to
    return pair


def _run(pair, steps=8, shift=5.0, cfg=1.0, portrait=True):
    f_lat = 2
    cond = _cond(f_lat)
    port = _two_people(f_lat, 4, TINY_ADAPTER["proj_dim"]) if portrait else None
    resolved = SamplingOptions(steps=steps, shift=shift, cfg=cfg, portrait_cfg=2.0, seed=3).resolve()
    out = generate_latent(None, None, cond, port, 5, 32, 32, device="cpu", resolved=resolved, experts=pair)
    return out, resolved


def test_expert_switch_at_the_boundary_records_which_expert_ran(wan22):
    log = []
    pair = _pair(wan22, log=log)
    out, resolved = _run(pair)
    assert torch.isfinite(out).all()
    sigmas = [float(s) for s in resolved.schedule[:-1]]
    expected = ["high" if s >= 0.9 else "low" for s in sigmas]  # Wan2.2 I2V: t >= 0.900 · 1000
    assert "high" in expected and "low" in expected
    assert pair.trace == list(zip(sigmas, expected))
    forwards = [(name, t) for kind, name, t, *_ in log if kind == "forward"]
    # cfg 1 + portrait cfg 2: both passes of a step in one batched forward of that step's expert
    assert [name for name, _ in forwards] == expected
    for (name, t), s in zip(forwards, sigmas):
        assert t == pytest.approx(1000 * s, rel=1e-6)
    # moves: high in before its first forward; at the switch high out, then low in; low out at the end
    moves = [(n, d) for kind, n, d, *_ in [e for e in log if e[0] == "to"]]
    assert moves == [("high", "cpu"), ("high", "cpu"), ("low", "cpu"), ("low", "cpu")]  # device and offload: cpu here
    assert log[0][:2] == ("to", "high") and log[-1][:2] == ("to", "low")
    switch = next(i for i, e in enumerate(log) if e[0] == "forward" and e[1] == "low")
    assert [e[:2] for e in log[switch - 2:switch]] == [("to", "high"), ("to", "low")]  # out before in


def test_a_different_boundary_moves_the_switch(wan22):
    pair = _pair(wan22, boundary=0.5)
    _, resolved = _run(pair, steps=6)
    sigmas = [float(s) for s in resolved.schedule[:-1]]
    assert [n for _, n in pair.trace] == ["high" if s >= 0.5 else "low" for s in sigmas]


@pytest.mark.parametrize("adapter_on", ["both", "high", "low"])
def test_adapter_on_chooses_the_experts_with_the_portrait_branch(wan22, adapter_on):
    log = []
    pair = _pair(wan22, adapter_on=adapter_on, log=log)
    _run(pair, steps=6)
    seen = {}
    for kind, name, *rest in log:
        if kind == "forward":
            seen.setdefault(name, set()).add(rest[1])
    # with the portrait: the batched forward carries the condition (its portrait rows); without: none
    for name in ("high", "low"):
        assert seen[name] == ({True} if adapter_on in ("both", name) else {False}), name


def test_both_adapter_settings_change_the_result_and_bad_options_are_named(wan22):
    a, _ = _run(_pair(wan22, adapter_on="both"))
    b, _ = _run(_pair(wan22, adapter_on="high"))
    c, _ = _run(_pair(wan22), portrait=False)
    assert not torch.equal(a, b) and not torch.equal(b, c)
    with pytest.raises(ValueError, match="boundary must be between 0 and 1"):
        check_expert_options(1.5, "both")
    with pytest.raises(ValueError, match="adapter_on 'middle' is unknown"):
        check_expert_options(0.9, "middle")


def test_context_windows_run_on_each_expert(wan22):
    """Long videos: each expert gets the same context-window denoiser as Wan2.1 (windows of 2 latent
    frames over 3 here); both experts run, the result is finite and differs from one pass."""
    pair = _pair(wan22)
    f_lat = 3
    cond = _cond(f_lat)
    port = _two_people(f_lat, 4, TINY_ADAPTER["proj_dim"])
    resolved = SamplingOptions(steps=4, shift=5.0, cfg=1.0, portrait_cfg=2.0, seed=3).resolve()
    windowed = generate_latent(None, None, cond, port, 9, 32, 32, device="cpu", resolved=resolved, experts=pair,
                               context_frames=5, context_overlap=4, window_anchor="none")
    assert [n for _, n in pair.trace] == ["high" if float(s) >= 0.9 else "low" for s in resolved.schedule[:-1]]
    whole = generate_latent(None, None, cond, port, 9, 32, 32, device="cpu", resolved=resolved, experts=_pair(wan22))
    assert torch.isfinite(windowed).all() and not torch.allclose(windowed, whole)

import copy

import numpy as np
import pytest
import torch

from fantasyportrait_core.sampling import generate
from fantasyportrait_core.drive.condition import portrait_condition
from fantasyportrait_core.drive.encode import DrivingExpression
from fantasyportrait_core.model.attention import attach_portrait_processors
from fantasyportrait_core.sampling.windows import context_windows, window_weights
from fantasyportrait_core.model.denoiser import I2VConditioning
from fantasyportrait_core.faces.face import FaceTrack


def test_windows_cover_and_overlap():
    assert context_windows(15, 21, 4) == [(0, 15)]
    w = context_windows(41, 21, 4)
    assert w[0] == (0, 21) and w[-1] == (20, 41)
    assert all(b[0] < a[1] and a[1] - b[0] >= 4 for a, b in zip(w, w[1:]))
    weights = window_weights(w, 41)
    torch.testing.assert_close(weights.sum(0), torch.ones(41))
    assert (weights >= 0).all()
    with pytest.raises(ValueError):
        context_windows(30, 5, 5)


def test_161_frames_without_seams(tiny):
    """161 frames (41 latent frames) through 21-latent-frame windows: the output has every frame and
    no jump at a window seam larger than the frame-to-frame changes inside the windows."""
    transformer, adapter, vae, _ = tiny
    model = copy.deepcopy(transformer)
    state = attach_portrait_processors(model, adapter)
    num_frames, h, w = 161, 4, 4
    g = torch.Generator().manual_seed(0)
    feats = torch.cumsum(torch.randn(num_frames, 554, generator=g) * 0.1, 0)  # smooth expression motion
    track = FaceTrack(np.tile([0.0, 0, 32, 32], (num_frames, 1)), np.zeros((num_frames, 5, 2)), np.ones(num_frames, bool))
    portrait = portrait_condition(adapter, [DrivingExpression(feats, track)], num_frames, None)
    c = model.config
    f_lat = 41
    y = torch.cat([torch.zeros(1, 4, f_lat, h, w), torch.randn(1, 16, f_lat, h, w, generator=g)], 1)
    y[:, :4, 0] = 1
    cond = I2VConditioning(torch.randn(1, 8, c.text_dim, generator=g), None,
                           torch.randn(1, 257, c.image_dim, generator=g), y)
    latent = generate.generate_latent(model, state, cond, portrait, num_frames, w * 8, h * 8, steps=3, seed=1,
                                      context_frames=81, context_overlap=16)
    assert latent.shape == (1, 16, f_lat, h, w)
    frames = generate.decode_latent(vae, latent)
    assert frames.shape[0] == 161
    step = np.abs(np.diff(latent[0].numpy(), axis=1)).mean(axis=(0, 2, 3))  # change between latent frames
    windows = context_windows(41, 21, 4)
    assert len(windows) == 3
    # step[i] is the change from latent frame i to i+1; a window edge at frame s sits between s-1 and s
    edges = sorted({s - 1 for s, _ in windows[1:]} | {e - 1 for _, e in windows[:-1]})
    inside = np.delete(step, edges)
    assert step[edges].max() <= inside.max() * 1.5


def test_blending_removes_window_disagreement_seams():
    """Windows that disagree (window k predicts a constant k) must be joined by ramps: a hard cut
    would jump by 1 at each seam; blended, a step is at most two overlapping ramps' slopes."""
    from fantasyportrait_core.sampling.windows import ContextWindowDenoiser

    den = ContextWindowDenoiser.__new__(ContextWindowDenoiser)
    den.windows = context_windows(41, 21, 4)
    den.weights = window_weights(den.windows, 41)
    den.anchored = [False] * len(den.windows)

    class Const:
        def __init__(self, k):
            self.k = k

        def __call__(self, x, sigma):
            return torch.full_like(x, float(self.k))

    den.parts = [Const(k) for k in range(len(den.windows))]
    x0 = den(torch.zeros(1, 1, 41, 1, 1), 0.5)[0, 0, :, 0, 0]
    overlaps = [a[1] - b[0] for a, b in zip(den.windows, den.windows[1:])]
    steps = x0.diff().abs()
    assert steps.max() <= 2 / (min(overlaps) + 1) + 1e-6 < 1
    assert x0[0] == 0 and x0[-1] == len(den.windows) - 1


def _long_setup(tiny, num_frames=161, h=4, w=4):
    transformer, adapter, _, _ = tiny
    model = copy.deepcopy(transformer)
    state = attach_portrait_processors(model, adapter)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(num_frames, 554, generator=g)
    track = FaceTrack(np.tile([0.0, 0, 32, 32], (num_frames, 1)), np.zeros((num_frames, 5, 2)), np.ones(num_frames, bool))
    portrait = portrait_condition(adapter, [DrivingExpression(feats, track)], num_frames, None)
    c = model.config
    f_lat = (num_frames - 1) // 4 + 1
    y = torch.cat([torch.zeros(1, 4, f_lat, h, w), torch.randn(1, 16, f_lat, h, w, generator=g)], 1)
    y[:, :4, 0] = 1
    cond = I2VConditioning(torch.randn(1, 8, c.text_dim, generator=g), None,
                           torch.randn(1, 257, c.image_dim, generator=g), y)
    calls = []

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        calls.append((hidden.detach().clone(), state.condition))

    model.register_forward_pre_hook(record, with_kwargs=True)
    return model, state, portrait, cond, calls


def test_windows_after_the_first_are_anchored_on_the_reference(tiny):
    """161 frames in windows of 81: every window after the first now receives the reference
    condition (mask 1 + reference latent) in front of its own frames, with latent frame 0's current
    state as input and frame 0's expression tokens; without the anchor it got zeros there."""
    model, state, portrait, cond, calls = _long_setup(tiny)
    ref_latent = cond.image_latent[:, 4:, 0]
    assert ref_latent.abs().sum() > 0
    generate.generate_latent(model, state, cond, portrait, 161, 32, 32, steps=1, seed=1, context_frames=81,
                             context_overlap=16, window_anchor="reference", batch_passes=1)
    # one step, cfg 1 + portrait cfg 4: 2 passes per window (one per forward here); windows start at latent 0, 10, 20
    assert [c[0].shape[2] for c in calls] == [21, 21, 22, 22, 22, 22]
    x0 = calls[0][0][:, :16, 0]  # latent frame 0 as the first window sees it
    for hidden, condition in calls[2:]:
        mask, image = hidden[:, 16:20], hidden[:, 20:]
        assert (mask[:, :, 0] == 1).all() and (mask[:, :, 1:] == 0).all()
        torch.testing.assert_close(image[:, :, 0], ref_latent.to(image.dtype))
        torch.testing.assert_close(hidden[:, :16, 0], x0)
        if condition is not None:
            torch.testing.assert_close(condition.windows[:, 0], portrait.windows[:, 0])
    windows = context_windows(41, 21, 4)
    assert windows[1][0] > 0 and calls[2][1] is not None

    calls.clear()
    generate.generate_latent(model, state, cond, portrait, 161, 32, 32, steps=1, seed=1, context_frames=81,
                             context_overlap=16, window_anchor="none", batch_passes=1)
    assert [c[0].shape[2] for c in calls] == [21] * 6
    assert all((hidden[:, 16:20] == 0).all() for hidden, _ in calls[2:]), "the old input: no reference"


def test_one_pass_is_the_default(tiny):
    model, state, portrait, cond, calls = _long_setup(tiny)
    latent = generate.generate_latent(model, state, cond, portrait, 161, 32, 32, steps=1, seed=1)
    assert latent.shape[2] == 41 and [tuple(c[0].shape[:3:2]) for c in calls] == [(2, 41)]  # both passes, one forward


def test_plan_one_pass_when_it_fits():
    """201 frames at 720x416 on the 14B in fp8 (15.5 GiB of weights + 1.6 GiB of adapter K/V):
    51 latent frames x 45 x 26 = 59,670 tokens, ~6.5 GiB of activations per guidance pass (the H100
    bare-forward peaks: ~115 KB per token above the weights). One pass when the memory plan fits the
    whole video, else windows of context_frames (anchored windows: one latent frame more)."""
    from fantasyportrait_core.sampling.windows import plan_context
    from fantasyportrait_core.runtime.memory import model_size, plan_sampling
    from fantasyportrait_core.model.build import WAN21_I2V_14B
    from fantasyportrait_core.sampling.guidance import guidance_passes

    size, gib = model_size(WAN21_I2V_14B), 2**30
    passes = guidance_passes(1.0, 4.0)  # the reference guidance: 2 passes per step

    def plan(free_gib, **kw):
        free = None if free_gib is None else int(free_gib * gib)
        return plan_sampling(size, 720, 416, 201, free, passes, storage="fp8", offload="none", **kw)

    window, p = plan(40)  # 17.1 GiB weights + 2 x ~7 GiB: both passes in one forward over the whole video
    assert window is None and p.fits and p.tokens == 51 * 45 * 26 == 59670 and p.batch_passes == 2
    window, p = plan(23)  # one pass needs ~25 GiB: windows of 81 frames (21 + 1 anchor latent frames)
    assert window == 81 and p.fits and p.tokens == 22 * 45 * 26
    assert plan(23, anchored=False)[1].tokens == 21 * 45 * 26
    assert plan(None)[0] is None  # no GPU / unknown memory: one pass, as the reference
    assert plan(4, long_video="one_pass")[0] is None
    assert plan(80, long_video="windows", context_frames=61)[0] == 61
    assert plan_context(81, "windows", 81, lambda f: False) is None  # not longer than a window
    assert plan_context(201, "auto", 81, lambda f: f <= 100) == 81 and plan_context(201, "auto", 81, lambda f: True) is None
    with pytest.raises(ValueError, match="context mode"):
        plan_context(201, "sometimes")
    with pytest.raises(ValueError, match="at least 5 frames"):
        plan_context(201, "windows", 3)

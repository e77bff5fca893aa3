import copy

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from fantasyportrait_core.model.adapter import window_length
from fantasyportrait_core.model.attention import (PortraitCondition, attach_portrait_processors, portrait_attention_mask,
                                            portrait_branch)
from fantasyportrait_core.faces.regions import token_person_ids

HEADS, HEAD_DIM, PROJ = 2, 12, 32


def _projections(seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.nn.Linear(PROJ, HEADS * HEAD_DIM, bias=False)
    v = torch.nn.Linear(PROJ, HEADS * HEAD_DIM, bias=False)
    with torch.no_grad():
        k.weight.copy_(torch.randn(k.weight.shape, generator=g))
        v.weight.copy_(torch.randn(v.weight.shape, generator=g))
    return k, v


def test_portrait_branch_equals_per_frame_loop():
    """Batched branch == explicit loop over latent frames with plain softmax attention."""
    f_lat, s, lk = 3, 10, 7
    k_proj, v_proj = _projections()
    q = torch.randn(2, f_lat * s, HEADS, HEAD_DIM)
    windows = torch.randn(2, f_lat, lk, PROJ)
    out = portrait_branch(q, windows, k_proj, v_proj)
    for b in range(2):
        for f in range(f_lat):
            qf = q[b, f * s:(f + 1) * s].transpose(0, 1)  # [H, s, D]
            kf = k_proj(windows[b, f]).view(lk, HEADS, HEAD_DIM).transpose(0, 1)
            vf = v_proj(windows[b, f]).view(lk, HEADS, HEAD_DIM).transpose(0, 1)
            att = torch.softmax(qf @ kf.transpose(1, 2) / HEAD_DIM**0.5, dim=-1) @ vf
            torch.testing.assert_close(out[b, f * s:(f + 1) * s], att.transpose(0, 1).reshape(s, -1),
                                       rtol=1e-5, atol=1e-5)


def _three_people_setup():
    f_lat, s, n = 2, 12, 3
    w = window_length()
    latent_person = torch.tensor([0, 1, 1, 2, 2, 3, 3, 0, 1, 2, 3, 0]).repeat(f_lat, 1)
    token_person = token_person_ids(n, w)
    windows = torch.randn(1, f_lat, n * w, PROJ)
    q = torch.randn(1, f_lat * s, HEADS, HEAD_DIM)
    return q, windows, latent_person, token_person, f_lat, s, w


def test_each_person_depends_only_on_own_tokens():
    q, windows, latent_person, token_person, f_lat, s, w = _three_people_setup()
    k_proj, v_proj = _projections()
    base = portrait_branch(q, windows, k_proj, v_proj, latent_person, token_person)
    assert torch.isfinite(base).all()
    ids = latent_person.reshape(-1)
    for person in (1, 2, 3):
        perturbed = windows.clone()
        perturbed[:, :, (person - 1) * w: person * w] += 5 * torch.randn_like(perturbed[:, :, :w])
        out = portrait_branch(q, perturbed, k_proj, v_proj, latent_person, token_person)
        delta = (out - base).abs().sum(-1)[0]
        assert delta[ids == person].min() > 0, "own tokens must matter"
        assert delta[ids != person].max() == 0, "other people's and background tokens must not move"
    assert base[0, ids == 0].abs().max() == 0, "background gets no portrait branch"


def test_mask_shape_and_background_rows():
    latent_person = torch.tensor([[0, 1, 2]])
    mask = portrait_attention_mask(latent_person, torch.tensor([1, 1, 2]))
    assert mask.shape == (1, 1, 3, 3)
    assert mask[0, 0].tolist() == [[True, True, True], [True, True, False], [False, False, True]]


def test_condition_validation():
    import pytest

    with pytest.raises(ValueError, match="together"):
        PortraitCondition(torch.zeros(1, 1, 4, 2), token_person=torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="ids for"):
        PortraitCondition(torch.zeros(1, 1, 4, 2), torch.ones(3, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))


def _inputs(transformer, f_lat=2, h=4, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    x = torch.randn(1, cfg.in_channels, f_lat, h, w, generator=g)
    text = torch.randn(1, 512, cfg.text_dim, generator=g)
    img = torch.randn(1, 257, cfg.image_dim, generator=g)
    t = torch.tensor([700.0])
    return x, t, text, img


def test_processor_without_condition_matches_diffusers(tiny):
    transformer, adapter, _, _ = tiny
    base = copy.deepcopy(transformer)
    base.set_attn_processor(WanAttnProcessor())
    ours = copy.deepcopy(transformer)
    state = attach_portrait_processors(ours, adapter)
    x, t, text, img = _inputs(transformer)
    with torch.no_grad():
        ref = base(x, t, text, encoder_hidden_states_image=img, return_dict=False)[0]
        out = ours(x, t, text, encoder_hidden_states_image=img, return_dict=False)[0]
        torch.testing.assert_close(out, ref)
        # scale 0 is the base model too; scale 1 is not
        windows = torch.randn(1, 2, 97, adapter.proj_dim)
        state.condition = PortraitCondition(windows, scale=0.0)
        torch.testing.assert_close(ours(x, t, text, encoder_hidden_states_image=img, return_dict=False)[0], ref)
        state.condition = PortraitCondition(windows, scale=1.0)
        moved = ours(x, t, text, encoder_hidden_states_image=img, return_dict=False)[0]
    assert (moved - ref).abs().max() > 1e-3


def test_cross_attention_layer_masks_people(tiny):
    """At a real block's cross-attention: perturbing person 2's tokens moves only person 2's tokens."""
    transformer, adapter, _, _ = tiny
    model = copy.deepcopy(transformer)
    state = attach_portrait_processors(model, adapter)
    attn = model.blocks[0].attn2
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    f_lat, s, w = 2, 16, window_length()
    hidden = torch.randn(1, f_lat * s, dim)
    context = torch.randn(1, 257 + 512, dim)
    latent_person = torch.zeros(f_lat, s, dtype=torch.long)
    latent_person[:, 2:6], latent_person[:, 9:13] = 1, 2
    windows = torch.randn(1, f_lat, 2 * w, adapter.proj_dim)
    state.condition = PortraitCondition(windows, token_person_ids(2, w), latent_person)
    with torch.no_grad():
        base = attn(hidden, context)
        windows2 = windows.clone()
        windows2[:, :, w:] = torch.randn_like(windows2[:, :, w:])
        state.condition = PortraitCondition(windows2, token_person_ids(2, w), latent_person)
        out = attn(hidden, context)
        state.condition = None
        no_portrait = attn(hidden, context)
    delta = (out - base).abs().sum(-1)[0]
    ids = latent_person.reshape(-1)
    assert delta[ids == 2].min() > 0
    assert delta[ids != 2].max() == 0
    torch.testing.assert_close(base[0, ids == 0], no_portrait[0, ids == 0])


def test_sdpa_boolean_mask_has_exact_zero_weight():
    """The independence above relies on SDPA giving exactly 0 weight to masked keys."""
    q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    mask = torch.tensor([[True, True, False, False, False]]).expand(3, 5)[None, None]
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    v2 = v.clone()
    v2[..., 2:, :] += 100
    k2 = k.clone()
    k2[..., 2:, :] -= 100
    assert torch.equal(a, F.scaled_dot_product_attention(q, k2, v2, attn_mask=mask))

"""The native-MODEL patch's pieces that need no ComfyUI: which batch rows get the portrait, the per-grid
condition (same layout and windows as our sampler), frame selection for context windows, the
per-forward swap of the cross-attention, the I2V image-latent windowing, and the nodes' errors
outside ComfyUI. The patch inside a real ComfyUI: tests/test_native_comfyui.py."""

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import nodes
from fantasyportrait_core.drive.condition import portrait_condition
from fantasyportrait_core.drive.encode import DrivingExpression
from fantasyportrait_core.model.attention import apply_portrait
from fantasyportrait_core.faces.face import Face, FaceTrack
from nodes import native
from nodes.portrait import PortraitInputs
from nodes.sampler import portrait_layout

from . import checkpoint_writers as W


def _portrait(n: int, frames: int = 13, ref=(192, 128)) -> PortraitInputs:
    g = torch.Generator().manual_seed(n)
    boxes = [np.array([10.0, 20, 60, 80]), np.array([120.0, 30, 170, 90])][:n]
    drivers = [DrivingExpression(torch.randn(frames, 554, generator=g),
                                 FaceTrack(np.tile(b, (frames, 1)), np.zeros((frames, 5, 2)), np.ones(frames, bool)))
               for b in boxes]
    return PortraitInputs([Face(b, np.zeros((5, 2)), 0.9) for b in boxes], drivers, ref[0], ref[1], 1.0, [None] * n)


@pytest.fixture(scope="module")
def adapter(tiny):
    return tiny[1]


def test_portrait_rows_follow_the_guider_passes():
    assert native.portrait_rows(2, {}) is None  # KSampler & co: portrait in every pass
    opts = {native.PASSES_KEY: [True, False, False], "cond_or_uncond": [0, 1, 2]}
    assert native.portrait_rows(3, opts).tolist() == [0]
    # ComfyUI split the passes (memory): this forward holds passes 2 and 1, batch 2 each
    assert native.portrait_rows(4, {**opts, "cond_or_uncond": [2, 1]}) is False
    assert native.portrait_rows(4, {**opts, "cond_or_uncond": [1, 0]}).tolist() == [2, 3]
    # portrait_cfg <= 1: both passes carry the portrait
    assert native.portrait_rows(2, {native.PASSES_KEY: [True, True], "cond_or_uncond": [0, 1]}) is None


def test_condition_is_the_samplers_for_the_grid(adapter):
    portrait = _portrait(2)
    run = native.NativePortrait(portrait, adapter, adapter.ip_adapter)
    f_lat, h, w = 3, 4, 6  # 9 frames, 96x64 pixels
    cond = run.condition((f_lat, h, w), None, torch.device("cpu"))
    layout = portrait_layout(portrait, 96, 64, 9)
    ref = portrait_condition(adapter, portrait.drivers, 9, layout, 1.0)
    assert torch.equal(cond.windows, ref.windows) and torch.equal(cond.latent_person, ref.latent_person)
    assert torch.equal(cond.token_person, ref.token_person)
    assert set(cond.latent_person.unique().tolist()) == {0, 1, 2}

    # a context window (any frames, any order) gets exactly those frames of the whole clip
    frames = [2, 1]
    win = run.condition((2, h, w), frames, torch.device("cpu"))
    full = portrait_condition(adapter, portrait.drivers, 13, portrait_layout(portrait, 96, 64, 13), 1.0)
    assert torch.equal(win.windows, full.windows[:, frames]) and torch.equal(win.latent_person, full.latent_person[frames])
    assert torch.equal(full.windows[:, :f_lat], ref.windows)  # a frame's window does not depend on the length
    with pytest.raises(ValueError, match="at most 13"):
        run.condition((5, h, w), None, torch.device("cpu"))  # 13 driving frames cover 4 latent frames
    run.clear()


def test_add_portrait_only_on_its_rows(adapter):
    portrait = _portrait(1)
    run = native.NativePortrait(portrait, adapter, adapter.ip_adapter)
    cond = run.condition((2, 2, 2), None, torch.device("cpu"))
    k, v = run.kv_projections(1)
    g = torch.Generator().manual_seed(0)
    q, out = torch.randn(3, 8, adapter.dim, generator=g), torch.randn(3, 8, adapter.dim, generator=g)
    heads = 2
    got = native.add_portrait(out, q, (cond, torch.tensor([1])), heads, k, v)
    term = apply_portrait(q[1:2].view(1, 8, heads, -1), cond, k, v)
    assert torch.equal(got[0], out[0]) and torch.equal(got[2], out[2])
    torch.testing.assert_close(got[1], out[1] + term[0], rtol=0, atol=1e-6)
    everywhere = native.add_portrait(out, q, (cond, None), heads, k, v)
    torch.testing.assert_close(everywhere, out + apply_portrait(q.view(3, 8, heads, -1), cond, k, v))


class _Executor:
    def __init__(self, class_obj, fn):
        self.class_obj, self.fn = class_obj, fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class _RMSNorm(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class _I2VCrossAttention(torch.nn.Module):
    """A Wan2.1 I2V cross-attention with the structure of ComfyUI's (written here from the Wan2.1 paper's
    description, not copied): text and CLIP-image attention over the same normalised query, summed,
    then ``o``. ``bypass_o`` stands in for a core that applies ``o`` without calling the module."""

    def __init__(self, dim, heads, bypass_o=False):
        super().__init__()
        self.num_heads, self.bypass_o = heads, bypass_o
        for name in ("q", "k", "v", "o", "k_img", "v_img"):
            setattr(self, name, torch.nn.Linear(dim, dim))
        self.norm_q, self.norm_k, self.norm_k_img = _RMSNorm(dim), _RMSNorm(dim), _RMSNorm(dim)

    def attend(self, q, k, v):
        b, n, d = q.shape
        split = lambda t: t.view(b, -1, self.num_heads, d // self.num_heads).transpose(1, 2)  # noqa: E731
        return torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, d)

    def forward(self, x, context, context_img_len, transformer_options={}):
        img, txt = context[:, :context_img_len], context[:, context_img_len:]
        q = self.norm_q(self.q(x))
        out = self.attend(q, self.norm_k_img(self.k_img(img)), self.v_img(img))
        out = out + self.attend(q, self.norm_k(self.k(txt)), self.v(txt))
        return torch.nn.functional.linear(out, self.o.weight, self.o.bias) if self.bypass_o else self.o(out)


def _blocks(adapter, **kw):
    blocks = torch.nn.ModuleList(torch.nn.Module() for _ in range(adapter.num_layers))
    for b in blocks:
        b.cross_attn = _I2VCrossAttention(adapter.dim, 2, **kw)
    return blocks


def test_portrait_term_goes_into_the_blocks_own_cross_attention(adapter):
    """Hooked, the block's own forward gives o(attention + portrait term), the term from the query the
    block computed; the hooks exist only during the patched forward (also after an exception)."""
    run = native.NativePortrait(_portrait(1), adapter, adapter.ip_adapter)
    blocks = _blocks(adapter)
    model = SimpleNamespace(blocks=blocks)
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(2, 36, 2, 4, 4)  # 2 latent frames of 2x2 tokens: 8 tokens
    hidden, context = torch.randn(2, 8, adapter.dim, generator=g), torch.randn(2, 257 + 5, adapter.dim, generator=g)
    seen = {}

    def forward(x, t, context_, clip_fea, time_dim_concat, transformer_options):
        seen["out"] = [b.cross_attn(hidden, context, 257) for b in blocks]
        return "out"

    opts = {native.PASSES_KEY: [True, False], "cond_or_uncond": [0, 1]}  # row 0 with portrait, row 1 without
    assert run(_Executor(model, forward), x, None, None, None, None, opts) == "out"
    cond = run.condition((2, 2, 2), None, torch.device("cpu"))
    with torch.no_grad():
        for i, b in enumerate(blocks):
            ca = b.cross_attn
            q = ca.norm_q(ca.q(hidden))
            attn = ca.attend(q, ca.norm_k_img(ca.k_img(context[:, :257])), ca.v_img(context[:, :257]))
            attn = attn + ca.attend(q, ca.norm_k(ca.k(context[:, 257:])), ca.v(context[:, 257:]))
            term = apply_portrait(q[:1].view(1, 8, 2, -1), cond, *run.kv_projections(i))
            assert term.abs().max() > 1e-3
            torch.testing.assert_close(seen["out"][i][0], ca.o(attn[0] + term[0]), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(seen["out"][i][1], ca.o(attn[1]), rtol=1e-5, atol=1e-6)
    unhooked = [b.cross_attn(hidden, context, 257) for b in blocks]
    for b, out in zip(blocks, unhooked):
        assert not b.cross_attn.norm_q._forward_hooks and not b.cross_attn.o._forward_pre_hooks
    torch.testing.assert_close(unhooked[0][1], seen["out"][0][1])

    def boom(*args):
        blocks[0].cross_attn(hidden, context, 257)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        run(_Executor(model, boom), x, None, None, None, None, {})
    assert all(not b.cross_attn.norm_q._forward_hooks and not b.cross_attn.o._forward_pre_hooks for b in blocks)
    # a forward without portrait rows (the guider's plain passes) runs the model without hooks
    plain = {native.PASSES_KEY: [True, False], "cond_or_uncond": [1]}
    run(_Executor(model, lambda *a: seen.update(hooks=len(blocks[0].cross_attn.o._forward_pre_hooks))), x, None, None,
        None, None, plain)
    assert seen["hooks"] == 0
    with pytest.raises(ValueError, match="multiples of 16"):
        run(_Executor(model, forward), torch.zeros(1, 36, 2, 5, 4), None, None, None, None, {})


def test_a_core_the_hooks_cannot_reach_fails_loudly(adapter):
    """Never a result without the portrait: a cross-attention that applies o without calling the module,
    a block that is skipped, or a forward with more tokens than the latent grid each raise."""
    run = native.NativePortrait(_portrait(1), adapter, adapter.ip_adapter)
    g = torch.Generator().manual_seed(2)
    x = torch.zeros(1, 36, 2, 4, 4)
    context = torch.randn(1, 257 + 5, adapter.dim, generator=g)

    def forward_with(blocks, tokens=8, only=None):
        def forward(*args):
            for b in blocks[:only]:
                b.cross_attn(torch.randn(1, tokens, adapter.dim, generator=g), context, 257)
        return _Executor(SimpleNamespace(blocks=blocks), forward)

    with pytest.raises(RuntimeError, match="_I2VCrossAttention of this ComfyUI: norm_q ran 1x and o 0x"):
        run(forward_with(_blocks(adapter, bypass_o=True)), x, None, None, None, None, {})
    with pytest.raises(RuntimeError, match="norm_q ran 0x and o 0x"):
        run(forward_with(_blocks(adapter), only=1), x, None, None, None, None, {})
    with pytest.raises(ValueError, match="attends over 10 video tokens but the latent grid has 8"):
        run(forward_with(_blocks(adapter), tokens=10), x, None, None, None, None, {})
    for name in ("reference_latent", "context_latents"):
        with pytest.raises(ValueError, match=f"add frames or tokens to the video \\({name}\\)"):
            run(forward_with(_blocks(adapter)), x, None, None, None, None, {}, **{name: [torch.zeros(1)]})
    with pytest.raises(ValueError, match="time_dim_concat"):
        run(forward_with(_blocks(adapter)), x, None, None, None, torch.zeros(1), {})


class _Window:
    def __init__(self, index_list):
        self.index_list = index_list

    def get_tensor(self, full, device=None, dim=None):
        return full[(slice(None),) * dim + (self.index_list,)]


def test_i2v_image_latent_follows_the_context_window():
    c_concat = torch.arange(5.0).view(1, 1, 5, 1, 1).expand(1, 20, 5, 2, 2)
    x = torch.zeros(1, 16, 2, 2, 2)
    got = {}

    def apply_model(x, t, c_concat, *args, **kwargs):
        got["c"] = c_concat

    native.window_image_condition(apply_model, x, None, c_concat, transformer_options={"context_window": _Window([3, 4])})
    assert got["c"][0, 0, :, 0, 0].tolist() == [3.0, 4.0]
    native.window_image_condition(apply_model, torch.zeros(1, 16, 5, 2, 2), None, c_concat, transformer_options={})
    assert got["c"] is c_concat
    # newer ComfyUI: causal anchor in front of the listed frames (its x has one frame more)
    anchored = _Window([3, 4])
    anchored.causal_anchor_index = 0
    native.window_image_condition(apply_model, torch.zeros(1, 16, 3, 2, 2), None, c_concat,
                                  transformer_options={"context_window": anchored})
    assert got["c"][0, 0, :, 0, 0].tolist() == [0.0, 3.0, 4.0]
    # newer ComfyUI windows c_concat itself: it arrives with the window's length and is not cut again
    windowed = c_concat[:, :, [0, 3, 4]]
    native.window_image_condition(apply_model, torch.zeros(1, 16, 3, 2, 2), None, windowed,
                                  transformer_options={"context_window": anchored})
    assert got["c"] is windowed
    with pytest.raises(ValueError, match="needs frame 6"):
        native.window_image_condition(apply_model, x, None, c_concat, transformer_options={"context_window": _Window([5, 6])})


def test_window_frames_are_the_latents_frames():
    assert native.window_frames(None, 4) is None
    assert native.window_frames(_Window([2, 3]), 2) == [2, 3]
    anchored = _Window([2, 3])
    anchored.causal_anchor_index = 0
    assert native.window_frames(anchored, 3) == [0, 2, 3]
    anchored.causal_anchor_index = -1  # newer ComfyUI's "no anchor" (first window)
    assert native.window_frames(anchored, 2) == [2, 3]
    with pytest.raises(ValueError, match="lists 2 latent frames .* but its latent has 3"):
        native.window_frames(_Window([2, 3]), 3)


def test_condition_of_an_anchored_window_is_its_frames(adapter):
    """Under newer ComfyUI's causal_window_fix the forward of window [2, 3] gets latent frames [0, 2, 3]:
    the portrait condition is exactly those frames of the whole clip's condition."""
    portrait = _portrait(1)
    run = native.NativePortrait(portrait, adapter, adapter.ip_adapter)
    blocks = _blocks(adapter)
    seen = {}

    def forward(x, *args, **kwargs):
        for b in blocks:
            b.cross_attn(torch.randn(1, 12, adapter.dim), torch.randn(1, 257 + 5, adapter.dim), 257)
        seen["cond"] = dict(run._windows)
        return "out"

    window = _Window([2, 3])
    window.causal_anchor_index = 0
    run(_Executor(SimpleNamespace(blocks=blocks), forward), torch.zeros(1, 36, 3, 4, 4), None, None, None, None,
        {"context_window": window})
    (frames, cond), = seen["cond"].items()
    full = portrait_condition(adapter, portrait.drivers, 13, portrait_layout(portrait, 32, 32, 13), 1.0)
    assert frames == (0, 2, 3) and torch.equal(cond.windows, full.windows[:, [0, 2, 3]])


def test_nodes_outside_comfyui(tmp_path, tiny):
    path = W.write_adapter_repacked(tiny[1], str(tmp_path / "fp.safetensors"))
    (loaded,) = native.FantasyPortraitAdapterLoader().load(path, "fp32")
    assert isinstance(loaded, native.NativeAdapter) and loaded.adapter.num_layers == 2
    with pytest.raises(RuntimeError, match="only inside ComfyUI"):
        native.FantasyPortraitPatchModel().patch(object(), loaded, _portrait(1))
    with pytest.raises(ValueError, match="weight_dtype"):
        native.FantasyPortraitAdapterLoader().load(path, "int8")
    for name in ("FantasyPortraitAdapterLoader", "FantasyPortraitPatchModel", "FantasyPortraitGuider"):
        assert nodes.NODE_CLASS_MAPPINGS[name] is getattr(native, name)


def test_native_workflow_uses_only_core_nodes_and_ours():
    import json
    import os

    from .conftest import ROOT

    with open(os.path.join(ROOT, "workflows", "fantasyportrait_native.json")) as f:
        wf = json.load(f)
    types = {n["type"] for n in wf["nodes"]}
    core = {"UNETLoader", "LoraLoaderModelOnly", "ModelSamplingSD3", "CLIPLoader", "CLIPTextEncode", "CLIPVisionLoader",
            "CLIPVisionEncode", "LoadImage", "VAELoader", "WanImageToVideo", "KSamplerSelect", "BasicScheduler",
            "RandomNoise", "SamplerCustomAdvanced", "VAEDecode", "LoadVideo", "GetVideoComponents", "CreateVideo",
            "SaveVideo", "PreviewImage", "PreviewAny"}
    ours = {t for t in types if t.startswith("FantasyPortrait")}
    assert types - ours <= core, types - ours - core
    assert {"FantasyPortraitAdapterLoader", "FantasyPortraitPatchModel", "FantasyPortraitGuider"} <= ours
    assert "FantasyPortraitWanModelLoader" not in ours and "FantasyPortraitSampler" not in ours
    lora = next(n for n in wf["nodes"] if n["type"] == "LoraLoaderModelOnly")
    assert lora["mode"] == 4, "the LoRA ships bypassed"
    by_id = {n["id"]: n for n in wf["nodes"]}
    for link_id, src, slot, dst, dst_slot, typ in wf["links"]:
        assert by_id[src]["outputs"][slot]["type"] == typ
        assert by_id[dst]["inputs"][dst_slot]["type"] in (typ, "*")  # "*": Preview Any takes anything
    for name in ours:
        node = next(n for n in wf["nodes"] if n["type"] == name)
        spec = nodes.NODE_CLASS_MAPPINGS[name].INPUT_TYPES()
        spec = {**spec["required"], **spec.get("optional", {})}
        widgets = [k for k, v in spec.items() if isinstance(v[0], list) or v[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")]
        assert len(node.get("widgets_values", [])) == len(widgets) + (1 if "seed" in widgets else 0), name
        # sockets (inputs linked into a widget carry a "widget" entry and are counted as widgets)
        assert {i["name"] for i in node["inputs"] if "widget" not in i} == set(spec) - set(widgets), name


def test_resampler_latents_follow_the_input(tiny):
    """Under ComfyUI's partial loading the resamplers' learned latents (a bare parameter, which ComfyUI's
    loader does not move on its own) can sit elsewhere than the layers; they are taken to the input's
    device and dtype, so the tokens come out the same."""
    import copy

    adapter = copy.deepcopy(tiny[1])
    feats = torch.randn(1, 5, 554, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = adapter.expression_tokens(feats)
        for r in (adapter.mouth_proj_model, adapter.emo_proj_model):
            r.latents.data = r.latents.data.double()  # stands in for "left on another device"
        got = adapter.expression_tokens(feats)
    assert got.dtype == ref.dtype and torch.equal(got, ref)


class _CrossAttention(_I2VCrossAttention):
    def __init__(self):
        super().__init__(4, 2)


class _T2VCrossAttention(_CrossAttention):  # no CLIP-image attention (Wan2.2 I2V, T2V)
    def __init__(self):
        super().__init__()
        del self.k_img


def _wan(dim, layers, attention=_CrossAttention, model_type="i2v"):
    class WanModel(torch.nn.Module):  # the class name ComfyUI's Wan has
        pass

    m = WanModel()
    m.dim, m.model_type = dim, model_type
    m.blocks = torch.nn.ModuleList(torch.nn.Module() for _ in range(layers))
    for b in m.blocks:
        b.cross_attn = attention()
    return m


def test_patch_refuses_what_it_cannot_patch(adapter):
    native.check_wan_i2v(_wan(adapter.dim, adapter.num_layers), adapter)  # fits
    with pytest.raises(ValueError, match="Wan2.1 image-to-video"):
        native.check_wan_i2v(_wan(adapter.dim, adapter.num_layers, model_type="t2v"), adapter)
    with pytest.raises(ValueError, match="Wan2.1 image-to-video"):
        native.check_wan_i2v(torch.nn.Linear(2, 2), adapter)
    with pytest.raises(ValueError, match="fits a 2-block, 24-wide Wan"):
        native.check_wan_i2v(_wan(5120, 40), adapter)
    with pytest.raises(ValueError, match="WanModel's cross-attention _T2VCrossAttention has no k_img"):
        native.check_wan_i2v(_wan(adapter.dim, adapter.num_layers, _T2VCrossAttention), adapter)


def test_patch_takes_a_wan22_i2v_expert_as_comfyui_types_it(adapter):
    """ComfyUI loads each Wan2.2-I2V-A14B expert as WanModel model_type "t2v" (no img_emb) with in_dim 36
    and t2v cross-attention (q, norm_q, o; no k_img): patchable (experimental); a T2V model (in_dim 16) is not."""
    def t2v(in_dim):
        m = _wan(adapter.dim, adapter.num_layers, _T2VCrossAttention, model_type="t2v")
        m.in_dim = in_dim
        return m

    assert native.check_wan_i2v(t2v(36), adapter) == "Wan2.2-I2V-A14B expert"
    assert native.check_wan_i2v(_wan(adapter.dim, adapter.num_layers), adapter) == "Wan2.1-I2V"
    with pytest.raises(ValueError, match="Wan2.2-I2V-A14B expert"):
        native.check_wan_i2v(t2v(16), adapter)
    broken = t2v(36)
    for b in broken.blocks:
        del b.cross_attn.norm_q
    with pytest.raises(ValueError, match="has no norm_q"):
        native.check_wan_i2v(broken, adapter)

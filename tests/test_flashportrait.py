"""FlashPortrait (Francis-Rings/FlashPortrait @ c72d9de): checkpoints, family detection, the normalised
expression block and its guidance, against a literal port (tests/flash_reference.py)."""

import copy
import json
import os
import re

import pytest
import torch

from fantasyportrait_core.faces.regions import token_person_ids
from fantasyportrait_core.model.adapter import window_length
from fantasyportrait_core.model.attention import PortraitAttnProcessor, PortraitCondition, PortraitState, attach_portrait_processors
from fantasyportrait_core.model.build import TINY_ADAPTER, WAN21_I2V_14B, build_adapter, build_transformer
from fantasyportrait_core.model.denoiser import I2VConditioning, PortraitDenoiser, pad_text
from fantasyportrait_core.sampling.flow import NUM_TRAIN_TIMESTEPS
from fantasyportrait_core.weights.files import CheckpointError
from fantasyportrait_core.weights.keys import COMFY_PREFIX, portrait_family
from fantasyportrait_core.weights.load import check_family, load_adapter, load_expression_encoder, load_transformer
from fantasyportrait_core.weights.tiny import flashportrait_state_dicts, write_adapter_repacked, write_flashportrait

from . import flash_reference as R

DATA = os.path.join(os.path.dirname(__file__), "data")


def _manifest(name):
    with open(os.path.join(DATA, name)) as f:
        return {k: tuple(v) for k, v in json.load(f).items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def flash(tiny):
    """Tiny FlashPortrait: the tiny DiT with bf16-exact weights and a flash-family adapter with random K/V."""
    transformer, adapter, _, encoder = tiny
    t = copy.deepcopy(transformer)
    a = copy.deepcopy(adapter)
    a.family = "flashportrait"
    with torch.no_grad():
        for p in list(t.parameters()) + list(a.parameters()):
            p.copy_(p.to(torch.bfloat16).float())
    return t, a, encoder


def test_manifests_are_what_the_full_size_model_expects():
    """Our full-size (meta) DiT + flash adapter, written the FlashPortrait way, has exactly the key
    names and shapes of the manifests written from FlashPortrait's code."""
    t = build_transformer(WAN21_I2V_14B, empty=True)
    a = build_adapter(WAN21_I2V_14B, empty=True, family="flashportrait")
    dit, enc = flashportrait_state_dicts(t, a)
    assert {k: tuple(v.shape) for k, v in dit.items()} == _manifest("flashportrait_transformer_keys.json")
    assert {k: tuple(v.shape) for k, v in enc.items()} == _manifest("flashportrait_portrait_encoder_keys.json")
    assert portrait_family(dit) == "flashportrait" and portrait_family(enc) == "flashportrait encoder"


@pytest.mark.parametrize("layout,prefix", [("released", ""), ("single_file", ""), ("single_file", COMFY_PREFIX)])
def test_flashportrait_files_load_strictly(tmp_path, flash, layout, prefix):
    t, a, encoder = flash
    files = write_flashportrait(t, a, str(tmp_path), layout=layout, encoder=encoder, prefix=prefix)
    model = load_transformer(files["transformer"], dtype=torch.float32)
    assert model.portrait_family == "flashportrait"
    for k, v in t.state_dict().items():
        assert torch.equal(model.state_dict()[k].float(), v), k
    adapter = load_adapter(files["adapter"], dtype=torch.float32, kv_from=model.portrait_kv_paths)
    assert adapter.family == "flashportrait" and adapter.normalize_expression
    for k, v in a.state_dict().items():
        assert torch.equal(adapter.state_dict()[k].float(), v), k
    check_family(model, adapter)  # a matching pair passes
    enc = load_expression_encoder(files["pd_fpg"])
    assert all(torch.equal(enc.state_dict()[k], v) for k, v in encoder.state_dict().items())


def test_missing_and_unexpected_keys_are_named(tmp_path, flash):
    t, a, _ = flash
    dit, enc = flashportrait_state_dicts(t, a)
    enc = {k: v.clone() for k, v in enc.items() if k != "mouth_proj_model.proj_out.bias"}
    enc["emo_proj_model.extra.weight"] = torch.zeros(2)
    torch.save(enc, tmp_path / "portrait_encoder.pt")
    torch.save({k: v.clone() for k, v in dit.items()}, tmp_path / "transformer.pt")
    with pytest.raises(CheckpointError) as e:
        load_adapter(str(tmp_path / "portrait_encoder.pt"), kv_from=str(tmp_path / "transformer.pt"))
    assert "mouth_proj_model.proj_out.bias" in str(e.value) and "emo_proj_model.extra.weight" in str(e.value)
    dit.pop("blocks.1.cross_attn.emo_v_proj.weight")
    torch.save({k: v.clone() for k, v in dit.items()}, tmp_path / "transformer.pt")
    torch.save({k: v for k, v in enc.items() if "extra" not in k} | {"mouth_proj_model.proj_out.bias": a.state_dict()[
        "mouth_proj_model.proj_out.bias"]}, tmp_path / "portrait_encoder.pt")
    with pytest.raises(CheckpointError, match=re.escape("ip_adapter.blocks.1.cross_attn.ip_adapter_single_stream_v_proj")):
        load_adapter(str(tmp_path / "portrait_encoder.pt"), kv_from=str(tmp_path / "transformer.pt"))


def test_one_line_errors_when_families_are_mixed(tmp_path, flash, tiny):
    t, a, _ = flash
    files = write_flashportrait(t, a, str(tmp_path / "flash"))
    fantasy = write_adapter_repacked(tiny[1], str(tmp_path / "fantasy.safetensors"))
    plain = str(tmp_path / "wan.safetensors")
    from fantasyportrait_core.weights.tiny import write_wan_original
    write_wan_original(t, plain)
    flash_model = load_transformer(files["transformer"], dtype=torch.float32)
    plain_model = load_transformer(plain, dtype=torch.float32)
    assert plain_model.portrait_family == "wan"
    messages = []
    for call, match in [
        (lambda: load_adapter(fantasy, kv_from=flash_model.portrait_kv_paths), "FantasyPortrait adapter but the transformer is FlashPortrait"),
        (lambda: check_family(flash_model, load_adapter(fantasy)), "FlashPortrait's transformer but"),
        (lambda: load_adapter(files["adapter"]), "transformer.pt: load that as the transformer"),
        (lambda: load_adapter(files["transformer"]), "not its portrait encoder"),
        (lambda: load_transformer(files["adapter"]), "FlashPortrait's portrait encoder, not a transformer"),
        (lambda: load_transformer(fantasy), "FantasyPortrait adapter"),
    ]:
        with pytest.raises(CheckpointError, match=re.escape(match)) as e:
            call()
        messages.append(str(e.value))
    single = write_flashportrait(t, a, str(tmp_path / "single"), layout="single_file")
    with pytest.raises(CheckpointError, match="not FlashPortrait's transformer") as e:
        check_family(plain_model, load_adapter(single["adapter"]))
    messages.append(str(e.value))
    assert all("\n" not in m for m in messages)


# ------------------------------------------------------------------------------------------------
# Math: the normalised block and the guidance loop against the literal port


def _block_inputs(model, f_lat=3, s=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    return torch.randn(2, f_lat * s, dim, generator=g), torch.randn(2, 257 + 512, dim, generator=g)


@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_normalized_block_matches_flashportrait(flash, scale):
    t, a, _ = flash
    attn = t.blocks[1].attn2
    k, v = a.kv_projections(1)
    hidden, context = _block_inputs(t)
    windows = torch.randn(2, 3, window_length(), a.proj_dim, generator=torch.Generator().manual_seed(2))
    state = PortraitState()
    proc = PortraitAttnProcessor(k, v, state, normalize=True)
    state.condition = PortraitCondition(windows, scale=scale)
    with torch.no_grad():
        ours = proc(attn, hidden, context)
        ref = R.flash_cross_attention(attn, k, v, hidden, context, windows, ip_scale=scale)
        plain = PortraitAttnProcessor(k, v, state, normalize=False)(attn, hidden, context)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-2, "the normalisation must change the FantasyPortrait branch"


def _reference_model(t, a, state):
    """A copy of the DiT whose cross-attention runs the literal FlashPortrait block."""
    ref = copy.deepcopy(t)

    class Proc:
        def __init__(self, i):
            self.k, self.v = a.kv_projections(i)

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            windows, scale = state
            return R.flash_cross_attention(attn, self.k, self.v, hidden_states, encoder_hidden_states,
                                           windows.expand(hidden_states.shape[0], -1, -1, -1), ip_scale=scale)

    for i, block in enumerate(ref.blocks):
        block.attn2.set_processor(Proc(i))
    return ref


@pytest.mark.parametrize("cfg,pcfg", [(1.0, 4.0), (3.0, 4.0), (3.0, 1.0), (1.0, 1.0)])
@pytest.mark.parametrize("batch_passes", [None, 1])
def test_guidance_matches_flashportrait_loop(flash, cfg, pcfg, batch_passes):
    t, a, _ = flash
    model = copy.deepcopy(t)
    state = attach_portrait_processors(model, a)
    g = torch.Generator().manual_seed(3)
    c = model.config
    cond = I2VConditioning(torch.randn(1, 9, c.text_dim, generator=g), torch.randn(1, 9, c.text_dim, generator=g),
                           torch.randn(1, 257, c.image_dim, generator=g), torch.randn(1, 20, 2, 4, 4, generator=g))
    windows = torch.randn(1, 2, window_length(), a.proj_dim, generator=g)
    den = PortraitDenoiser(model, state, cond, PortraitCondition(windows), cfg=cfg, portrait_cfg=pcfg,
                           batch_passes=batch_passes)
    x, sigma = torch.randn(1, 16, 2, 4, 4, generator=g), 0.6
    slot = [windows, 1.0]
    ref_model = _reference_model(t, a, slot)
    text = {"positive": pad_text(cond.text_positive), "negative": pad_text(cond.text_negative)}

    def dit(latent, prompt, emo, ip_scale):
        slot[1] = ip_scale
        hidden = torch.cat([latent, cond.image_latent], dim=1)
        return ref_model(hidden, torch.tensor([sigma * NUM_TRAIN_TIMESTEPS]), text[prompt],
                         encoder_hidden_states_image=cond.image_context, return_dict=False)[0]

    with torch.no_grad():
        v_ref = R.flash_guidance_step(dit, x, windows, cfg, pcfg)
        ours = den(x, sigma)
    torch.testing.assert_close(ours, x - sigma * v_ref, rtol=1e-4, atol=1e-4)


def test_each_character_reaches_only_its_face_with_normalization(flash):
    """Several characters (ours, not FlashPortrait's): with the normalised block, perturbing person 2's
    tokens moves only person 2's latent tokens; the background gets no portrait term."""
    t, a, _ = flash
    model = copy.deepcopy(t)
    state = attach_portrait_processors(model, a)
    attn = model.blocks[0].attn2
    f_lat, s, w = 2, 16, window_length()
    hidden, context = _block_inputs(model, f_lat=f_lat, s=s)
    hidden, context = hidden[:1], context[:1]
    latent_person = torch.zeros(f_lat, s, dtype=torch.long)
    latent_person[:, 2:6], latent_person[:, 9:13] = 1, 2
    windows = torch.randn(1, f_lat, 2 * w, a.proj_dim)
    windows2 = windows.clone()
    windows2[:, :, w:] = torch.randn_like(windows2[:, :, w:]) * 3
    with torch.no_grad():
        state.condition = PortraitCondition(windows, token_person_ids(2, w), latent_person)
        base = attn(hidden, context)
        state.condition = PortraitCondition(windows2, token_person_ids(2, w), latent_person)
        out = attn(hidden, context)
        state.condition = None
        none = attn(hidden, context)
    ids = latent_person.reshape(-1)
    delta = (out - base).abs().sum(-1)[0]
    assert delta[ids == 2].min() > 0
    assert delta[ids != 2].max() == 0
    torch.testing.assert_close(base[0, ids == 0], none[0, ids == 0])


# ------------------------------------------------------------------------------------------------
# Our sampler through the CLI's real-model path, two characters


def test_cli_runs_flashportrait_release_with_two_characters(tmp_path, flash, tiny, monkeypatch, capsys):
    """transformer.pt + portrait_encoder.pt + pd_fpg.pth as released, two characters, our masks:
    the normalised block runs in every block of every portrait pass."""
    import json as _json

    import fantasyportrait_core.model.attention as attention
    import fantasyportrait_core.model.encoders as enc
    from fantasyportrait_core.cli import main

    from .conftest import data_path

    t, a, encoder = flash
    vae = tiny[2]
    files = write_flashportrait(t, a, str(tmp_path / "flash"), encoder=encoder)
    wan_dir = tmp_path / "wan"
    vae.save_pretrained(str(wan_dir / "vae"))

    class StandIn:
        def __init__(self, *args):
            pass

        def text(self, prompt):
            return torch.randn(1, 7, t.config.text_dim)

        def image(self, image):
            return torch.randn(1, 257, t.config.image_dim)

    monkeypatch.setattr(enc, "WanConditioners", StandIn)
    calls = []
    real = attention.normalize_expression

    def counting(branch, base, persons=None):
        calls.append(persons is not None)
        return real(branch, base, persons)

    monkeypatch.setattr(attention, "normalize_expression", counting)
    out = str(tmp_path / "flash.mp4")
    rc = main(["run", "--image", data_path("two_person.png"), "--driving", data_path("biden.mp4"),
               data_path("trump.mp4"), "--out", out, "--wan-dir", str(wan_dir), "--transformer", files["transformer"],
               "--adapter", files["adapter"], "--pd-fpg", files["pd_fpg"], "--dtype", "fp32", "--frames", "5",
               "--max-size", "128", "--steps", "1", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    report = _json.loads((txt := capsys.readouterr().out)[txt.index("{"):])
    assert len(report["reference_faces"]) == 2 and report["frames"] == 5
    assert calls and all(calls), "every portrait pass normalises, per character"
    assert len(calls) % t.config.num_layers == 0


# ------------------------------------------------------------------------------------------------
# Window preset 51/30


@pytest.mark.parametrize("num_latent", [51 + 2 * 21, 51 + 4 * 21])
def test_flashportrait_windows_and_blend_match_its_pipeline(num_latent):
    from fantasyportrait_core.sampling.windows import context_windows, sequential_blend_weights

    ref = R.flash_context_windows(num_latent)
    ours = context_windows(num_latent, 51, 30)
    assert [list(range(s, e)) for s, e in ours] == ref
    g = torch.Generator().manual_seed(0)
    preds = [torch.randn(1, 2, 51, 1, 1, generator=g, dtype=torch.float64) for _ in ours]
    w = sequential_blend_weights(ours, num_latent).double()
    mine = torch.zeros(1, 2, num_latent, 1, 1, dtype=torch.float64)
    for (s, e), p, wi in zip(ours, preds, w):
        mine[:, :, s:e] += p * wi[s:e].view(1, 1, -1, 1, 1)
    torch.testing.assert_close(mine, R.flash_blend(preds, ref, num_latent), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.sum(0), torch.ones(num_latent, dtype=torch.float64))


def test_later_window_condition_is_flashportraits_fresh_split():
    """A window starting at latent frame c: FlashPortrait re-splits the tokens of pixel frames 4c .. 4(c+n-1)
    as a clip of its own; ours restarts the first frame of the global windows: identical, per character."""
    from fantasyportrait_core.model.adapter import TOKENS_PER_FRAME as T
    from fantasyportrait_core.model.adapter import window_tokens
    from fantasyportrait_core.sampling.windows import slice_portrait

    frames, c, n = 33, 3, 4  # 9 latent frames, a window of 4 starting at latent 3
    g = torch.Generator().manual_seed(1)
    people = [torch.randn(1, frames * T, 8, generator=g) for _ in range(2)]
    windows = torch.cat([window_tokens(t, frames) for t in people], dim=2)
    cond = PortraitCondition(windows, token_person_ids(2, window_length()), torch.ones(9, 4, dtype=torch.long))
    part = slice_portrait(cond, c, c + n, restart=True)
    sub = 4 * (n - 1) + 1
    expected = torch.cat([window_tokens(t[:, 4 * c * T:(4 * c + sub) * T], sub) for t in people], dim=2)
    assert torch.equal(part.windows, expected)


def test_flashportrait_preset_reaches_the_denoiser(flash):
    from fantasyportrait_core.runtime.job import MemoryOptions
    from fantasyportrait_core.sampling.windows import ContextWindowDenoiser, plan_context, window_preset

    assert window_preset("flashportrait", 81, 16, "reference") == ("windows", 201, 120, "flashportrait")
    m = MemoryOptions(long_video="flashportrait")
    assert (m.long_video, m.context_frames, m.context_overlap, m.window_anchor) == ("windows", 201, 120, "flashportrait")
    assert plan_context(201 + 2 * 84, "flashportrait") == 201 and plan_context(201, "flashportrait") is None
    t, a, _ = flash
    model = copy.deepcopy(t)
    state = attach_portrait_processors(model, a)
    c = model.config
    f_lat = 93
    cond = I2VConditioning(torch.randn(1, 3, c.text_dim), None, torch.randn(1, 257, c.image_dim),
                           torch.randn(1, 20, f_lat, 2, 2))
    den = ContextWindowDenoiser(model, state, cond, PortraitCondition(torch.randn(1, f_lat, 97, a.proj_dim)), 1.0, 4.0,
                                window=51, overlap=30, anchor="flashportrait")
    assert den.windows == [(0, 51), (21, 72), (42, 93)]
    for part in den.parts:  # every window carries the first window's I2V condition
        assert torch.equal(part.cond.image_latent, cond.image_latent[:, :, :51])


def test_fast_mode_preset_is_flashportraits_step_distill_schedule():
    """preset flashportrait_fast: the sigmas of FlashPortrait's StepDistillScheduler and its step rule
    (literal port) on a velocity field, through our sampler."""
    from fantasyportrait_core.sampling.flow import PRESETS, sample, schedule_sigmas

    sig = schedule_sigmas(preset="flashportrait_fast")
    ref = R.flash_step_distill_sigmas()
    torch.testing.assert_close(sig, ref.float(), rtol=1e-6, atol=1e-6)
    assert PRESETS["flashportrait_fast"].cfg == 1.0 and len(sig) == 5
    g = torch.Generator().manual_seed(0)
    target, x = torch.randn(1, 4, 2, 2, 2, generator=g), torch.randn(1, 4, 2, 2, 2, generator=g)

    def velocity(x, sigma):  # some smooth field
        return torch.tanh(x) - target * (1 + sigma)

    ours = sample(lambda x, s: x - s * velocity(x, s), x.clone(), sig, PRESETS["flashportrait_fast"].sampler)
    theirs = x.clone()
    for i in range(4):
        theirs = R.flash_step_distill_step(velocity(theirs, float(ref[i])), ref, i, theirs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_model_loader_node_detects_the_family(tmp_path, flash, tiny):
    """Our Model Loader node with FlashPortrait's released files: the K/V come from transformer.pt and every
    block's processor normalises; a FantasyPortrait adapter beside FlashPortrait's DiT is one line."""
    from .test_nodes import run

    t, a, _ = flash
    files = write_flashportrait(t, a, str(tmp_path))
    (model,) = run("FantasyPortraitWanModelLoader", transformer=files["transformer"], adapter=files["adapter"],
                   weight_dtype="fp32", storage="same", offload="none")
    assert model.adapter.family == "flashportrait"
    assert all(b.attn2.processor.normalize for b in model.transformer.blocks)
    fantasy = write_adapter_repacked(tiny[1], str(tmp_path / "fantasy.safetensors"))
    with pytest.raises(CheckpointError, match="FantasyPortrait adapter but the transformer is FlashPortrait") as e:
        run("FantasyPortraitWanModelLoader", transformer=files["transformer"], adapter=fantasy, weight_dtype="fp32",
            storage="same", offload="none")
    assert "\n" not in str(e.value)

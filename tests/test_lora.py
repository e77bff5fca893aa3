"""LoRAs in every published layout change the transformer exactly as W + s·(alpha/rank)·B·A predicts;
removing them restores every weight bit for bit; unmatched keys are reported; fp8 storage too."""

import copy
import logging

import pytest
import torch

from fantasyportrait_core.weights.lora import LoraError, detect_layout, parse_lora_arg, read_lora
from fantasyportrait_core.weights.lora_apply import active_loras, apply_loras, remove_loras

from . import checkpoint_writers as W


@pytest.fixture()
def model(tiny):
    return copy.deepcopy(tiny[0]).eval()


def _inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return dict(hidden_states=torch.randn(1, 36, 2, 4, 4, generator=g), timestep=torch.tensor([700.0]),
                encoder_hidden_states=torch.randn(1, 512, c.text_dim, generator=g),
                encoder_hidden_states_image=torch.randn(1, 257, c.image_dim, generator=g), return_dict=False)


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_bit_identical(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k


@pytest.mark.parametrize("layout,lightx2v", [("diffusion_model", False), ("diffusion_model_AB", False),
                                             ("lora_unet", False), ("original", False), ("diffusers", False),
                                             ("diffusion_model", True)])
def test_layout_changes_weights_as_lora_formula_predicts(model, tmp_path, layout, lightx2v, caplog):
    path = str(tmp_path / f"{layout}.safetensors")
    expected = W.write_wan_lora(model, path, layout=layout, lightx2v=lightx2v)
    oracle = W.merge_lora_by_hand(copy.deepcopy(model), expected, strength=0.7)
    before = _snapshot(model)
    inputs = _inputs(model)
    plain = _forward(model, inputs)

    weights = read_lora(path, model)
    assert not weights.unmatched
    assert sorted(weights.layers) == sorted(expected["layers"])
    apply_loras(model, [(weights, 0.7)])
    out = _forward(model, inputs)
    torch.testing.assert_close(out, _forward(oracle, inputs), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, plain, atol=1e-3), "the LoRA must change the output"
    for layer in expected["layers"]:  # layer by layer, on its own input
        x = torch.randn(3, model.get_submodule(layer).in_features)
        torch.testing.assert_close(model.get_submodule(layer)(x), oracle.get_submodule(layer)(x), rtol=1e-5, atol=1e-5)
    for name in expected["diffs"]:  # full-weight deltas are applied exactly (fp32: one rounding)
        p = dict(model.named_parameters())
        got = next(v for k, v in p.items() if k.replace(".base_layer", "") == name)
        assert torch.equal(got, oracle.get_parameter(name)), name

    remove_loras(model)
    _assert_bit_identical(model, before)
    assert type(model.blocks[0].attn1.to_q) is torch.nn.Linear, "peft wrappers are removed"
    assert torch.equal(_forward(model, inputs), plain)


def test_unmatched_keys_are_reported_by_name_and_count(model, tmp_path, caplog):
    path = str(tmp_path / "extra.safetensors")
    extra = ("diffusion_model.blocks.7.self_attn.q.lora_down.weight", "diffusion_model.vace_blocks.0.proj.lora_up.weight",
             "diffusion_model.blocks.0.self_attn.q.weird")
    W.write_wan_lora(model, path, unmatched=extra)
    with caplog.at_level(logging.WARNING, logger="FantasyPortrait"):
        weights = read_lora(path, model)
    assert sorted(weights.unmatched) == sorted(extra)
    assert "3 keys matched no layer" in weights.summary() and "vace_blocks" in weights.summary()
    assert any("3 keys matched no layer" in r.message for r in caplog.records)


def test_several_loras_add_up_and_strength_changes_rescale(model, tmp_path):
    pa, pb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    ea = W.write_wan_lora(model, pa, seed=1)
    eb = W.write_wan_lora(model, pb, layout="lora_unet", seed=2, blocks=(1,))  # a partial musubi LoRA
    a, b = read_lora(pa, model), read_lora(pb, model)
    inputs = _inputs(model)
    before = _snapshot(model)
    for sa, sb in ((0.8, -0.5), (1.2, 0.3)):  # the second call only rescales (same files)
        apply_loras(model, [(a, sa), (b, sb)])
        assert active_loras(model) == [(a.key, sa), (b.key, sb)]
        oracle = W.merge_lora_by_hand(W.merge_lora_by_hand(tiny_base(model, before), ea, sa), eb, sb)
        torch.testing.assert_close(_forward(model, inputs), _forward(oracle, inputs), rtol=1e-4, atol=1e-5)
    apply_loras(model, [(b, 0.3)])  # dropping one keeps the other
    oracle_b = W.merge_lora_by_hand(tiny_base(model, before), eb, 0.3)
    torch.testing.assert_close(_forward(model, inputs), _forward(oracle_b, inputs), rtol=1e-4, atol=1e-5)
    apply_loras(model, [(a, 0.0)])  # strength 0 = off: back to the exact base weights
    _assert_bit_identical(model, before)


def tiny_base(model, state):
    """A plain copy of ``model`` (no peft wrappers) holding the weights ``state``."""
    from fantasyportrait_core.model.build import build_transformer

    plain = build_transformer(dict(model.config))
    plain.load_state_dict(state)
    return plain.eval()


def test_fp8_storage_applies_the_delta_at_matmul_time_and_unloads_exactly(tiny, tmp_path):
    """Scaled-fp8 linears get the LoRA as a bf16/fp32 low-rank delta: the output matches the
    dequantised fp8 weights plus the exact LoRA, and removing it leaves the fp8 bits untouched."""
    from fantasyportrait_core.weights.load import load_transformer
    from fantasyportrait_core.model.fp8 import ScaledFP8Linear

    ckpt = W.write_wan_original(tiny[0], str(tmp_path / "wan.safetensors"), dtype=torch.float32)
    fp8 = load_transformer(ckpt, dtype=torch.float32, storage_dtype=torch.float8_e4m3fn, num_heads=2)
    assert isinstance(fp8.blocks[0].attn1.to_q, ScaledFP8Linear)
    path = str(tmp_path / "lx.safetensors")
    expected = W.write_wan_lora(fp8, path, lightx2v=True)
    # oracle: an fp32 model holding the dequantised fp8 weights, LoRA merged by hand
    deq = tiny_base(tiny[0], {k: v for k, v in tiny[0].state_dict().items()})
    with torch.no_grad():
        for name, m in fp8.named_modules():
            if isinstance(m, ScaledFP8Linear):
                deq.get_submodule(name).weight.copy_(m.weight.float() * m.scale)
    oracle = W.merge_lora_by_hand(deq, expected, strength=0.9)
    before = _snapshot(fp8)
    inputs = _inputs(fp8)

    weights = read_lora(path, fp8)
    apply_loras(fp8, [(weights, 0.9)])
    assert fp8.blocks[0].attn1.to_q.lora_delta is not None
    torch.testing.assert_close(_forward(fp8, inputs), _forward(oracle, inputs), rtol=1e-4, atol=1e-5)
    # against the exact (unquantised) model + LoRA the error stays at fp8's own rounding level
    exact = _forward(W.merge_lora_by_hand(copy.deepcopy(tiny[0]), expected, strength=0.9), inputs)
    err = ((_forward(fp8, inputs) - exact).norm() / exact.norm()).item()
    remove_loras(fp8)
    plain = _forward(tiny[0], inputs)
    base_err = ((_forward(fp8, inputs) - plain).norm() / plain.norm()).item()
    assert 0 < err < 2 * base_err + 1e-4, (err, base_err)
    apply_loras(fp8, [(weights, 0.9)])

    remove_loras(fp8)
    assert fp8.blocks[0].attn1.to_q.lora_delta is None
    _assert_bit_identical(fp8, before)


def test_bf16_model_with_lora_runs(tiny, tmp_path):
    model = copy.deepcopy(tiny[0]).to(torch.bfloat16)
    path = str(tmp_path / "l.safetensors")
    W.write_wan_lora(model, path)
    before = _snapshot(model)
    apply_loras(model, [(read_lora(path, model), 1.0)])
    inputs = {k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in _inputs(model).items()}
    assert torch.isfinite(_forward(model, inputs).float()).all()
    remove_loras(model)
    _assert_bit_identical(model, before)


def test_lora_for_another_model_size_is_refused(model, tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "big.safetensors")
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 5120),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(5120, 4)}, path)
    with pytest.raises(LoraError, match="another model"):
        read_lora(path, model)
    save_file({"lora_te_text_model.layer.lora_down.weight": torch.zeros(4, 8)}, path)
    with pytest.raises(LoraError, match="not a Wan2.1 LoRA"):
        read_lora(path, model)
    with pytest.raises(LoraError, match="not found"):
        read_lora(str(tmp_path / "missing.safetensors"), model)


def test_layout_detection_and_cli_argument():
    assert detect_layout(["diffusion_model.blocks.0.self_attn.q.lora_down.weight"]) == "diffusion_model"
    assert detect_layout(["lora_unet_blocks_0_self_attn_q.lora_down.weight"]) == "lora_unet"
    assert detect_layout(["transformer.blocks.0.attn1.to_q.lora_A.weight"]) == "diffusers"
    assert detect_layout(["blocks.0.self_attn.q.lora_down.weight"]) == "original"
    assert detect_layout(["blocks.0.attn1.to_q.lora_A.weight"]) == "diffusers_bare"
    assert parse_lora_arg("style.safetensors:0.6") == ("style.safetensors", 0.6)
    assert parse_lora_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_arg(r"C:\loras\x.safetensors") == (r"C:\loras\x.safetensors", 1.0)
    assert parse_lora_arg(r"C:\loras\x.safetensors:-0.5") == (r"C:\loras\x.safetensors", -0.5)

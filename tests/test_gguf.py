"""GGUF transformers (city96's Wan2.1 layout) load through diffusers' GGUF support and match their
dequantised weights; LoRAs work on them."""


import pytest
import torch

from fantasyportrait_core.weights.files import CheckpointError
from fantasyportrait_core.weights.load import load_transformer
from fantasyportrait_core.weights.keys import wan_original_to_diffusers
from fantasyportrait_core.model.build import TINY_TRANSFORMER, build_transformer

from . import checkpoint_writers as W


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    torch.manual_seed(0)
    model = build_transformer(dict(TINY_TRANSFORMER, **W.GGUF_TINY)).eval()
    path = str(tmp_path_factory.mktemp("gguf") / "wan2.1-i2v-14b-480p-Q4_K_M.gguf")
    dequantised, qtypes = W.write_wan_gguf(model, path)
    return path, dequantised, qtypes


def _dense(model):
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    return {k: dequantize_gguf_tensor(v).float() if hasattr(v, "quant_type") else v.float()
            for k, v in model.state_dict().items()}


def test_gguf_loads_and_matches_its_dequantised_weights(gguf_file):
    from diffusers.quantizers.gguf.utils import GGUFLinear

    path, dequantised, qtypes = gguf_file
    assert {"Q4_K", "Q8_0", "F16", "F32"} <= set(qtypes.values())
    model = load_transformer(path, dtype=torch.float32)
    q = model.blocks[0].attn1.to_q
    assert isinstance(q, GGUFLinear) and q.weight.quant_type.name == "Q4_K" and q.weight.dtype == torch.uint8
    assert model.blocks[0].attn1.to_k.weight.quant_type.name == "Q8_0"
    dense = _dense(model)
    assert set(dense) == {wan_original_to_diffusers(k) for k in dequantised}
    for key, expected in dequantised.items():
        # diffusers dequantises in fp16 (block scale × quants, minus min for K-quants), gguf-py in fp32:
        # equal up to a few fp16 roundings at the tensor's magnitude; unquantised tensors bit for bit.
        exact = qtypes[key] in ("F32", "F16")
        atol = 0.0 if exact else 4 * 2.0 ** -11 * float(expected.abs().max())
        torch.testing.assert_close(dense[wan_original_to_diffusers(key)], expected, rtol=0 if exact else 1e-3,
                                   atol=atol, msg=lambda m: f"{key} ({qtypes[key]}): {m}")


def test_gguf_forward_equals_the_dequantised_model(gguf_file):
    path, dequantised, _ = gguf_file
    model = load_transformer(path, dtype=torch.float32)
    plain = build_transformer(dict(TINY_TRANSFORMER, **W.GGUF_TINY)).eval()
    plain.load_state_dict(_dense(model))  # the weights the GGUF layers dequantise to
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 36, 2, 4, 4, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 512, 256, generator=g),
                  encoder_hidden_states_image=torch.randn(1, 257, 256, generator=g), return_dict=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs)[0], plain(**inputs)[0], rtol=1e-4, atol=1e-5)


def test_lora_on_gguf_model_and_exact_removal(gguf_file, tmp_path):
    from fantasyportrait_core.weights.lora import read_lora
    from fantasyportrait_core.weights.lora_apply import apply_loras, remove_loras

    path, _, _ = gguf_file
    model = load_transformer(path, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora_path = str(tmp_path / "style.safetensors")
    expected = W.write_wan_lora(model, lora_path, rank=8)
    apply_loras(model, [(read_lora(lora_path, model), 0.5)])
    layer = "blocks.0.attn1.to_q"
    a, b, scale, _ = expected["layers"][layer]
    x = torch.randn(3, 256)
    dense_w = _dense(model)[layer + ".base_layer.weight"]
    bias = before[layer + ".bias"]
    torch.testing.assert_close(model.get_submodule(layer)(x), x @ (dense_w + 0.5 * scale * b @ a).T + bias,
                               rtol=1e-4, atol=1e-5)
    remove_loras(model)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_gguf_errors_name_the_fix(gguf_file, tmp_path):
    path, _, _ = gguf_file
    with pytest.raises(ValueError, match="GGUF file, already quantised: set storage to 'same'"):
        load_transformer(path, storage_dtype=torch.float8_e4m3fn)
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(open(path, "rb").read()[:1000])
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        load_transformer(str(bad))

"""Wan2.2-I2V-A14B experts (experimental): key manifests from the public code, strict loading of both
experts in every layout users have, one-line errors for a single expert or a Wan2.1 file."""

import json
import os

import pytest
import torch

from fantasyportrait_core.model.build import TINY_WAN22_EXPERT, WAN22_I2V_A14B_EXPERT, build_transformer
from fantasyportrait_core.weights.config import WAN22_I2V_EXPERT, infer_transformer_config, transformer_family
from fantasyportrait_core.weights.files import CheckpointError
from fantasyportrait_core.weights.keys import COMFY_PREFIX, wan_original_to_diffusers
from fantasyportrait_core.weights.experts import load_wan22_experts
from fantasyportrait_core.weights.load import load_transformer

from . import checkpoint_writers as W
from .conftest import REFERENCE

DATA = os.path.join(os.path.dirname(__file__), "data")


def _manifest(name):
    with open(os.path.join(DATA, name)) as f:
        return {k: tuple(v) for k, v in json.load(f).items() if not k.startswith("_")}


def test_expert_manifests_agree_with_the_key_map_and_the_model_we_build():
    original = _manifest("wan22_i2v_a14b_expert_original_keys.json")
    diffusers = _manifest("wan22_i2v_a14b_expert_diffusers_keys.json")
    assert len(original) == 1095
    # our rename table maps the Wan2.2 names onto the diffusers ones, shape for shape
    assert {wan_original_to_diffusers(k): s for k, s in original.items()} == diffusers
    # the Wan2.1-I2V release has exactly the image branch more (208 keys)
    with open(os.path.join(REFERENCE, "wan21_i2v_14b_original_keys.json")) as f:
        wan21 = {k for k in json.load(f) if not k.startswith("_")}
    extra = wan21 - set(original)
    assert set(original) < wan21 and len(extra) == 208
    assert all(k.startswith("img_emb.") or any(p in k for p in (".k_img.", ".v_img.", ".norm_k_img.")) for k in extra)
    # config inferred from the manifest's shapes = the expert config we build; it is an expert
    config = infer_transformer_config(diffusers)
    assert transformer_family(config) == WAN22_I2V_EXPERT
    for k in ("in_channels", "num_layers", "num_attention_heads", "ffn_dim", "image_dim", "added_kv_proj_dim"):
        assert config[k] == WAN22_I2V_A14B_EXPERT[k], k
    with torch.device("meta"):
        built = build_transformer(WAN22_I2V_A14B_EXPERT)
    assert {k: tuple(v.shape) for k, v in built.state_dict().items()} == diffusers


@pytest.fixture(scope="module")
def experts():
    torch.manual_seed(3)
    high, low = build_transformer(TINY_WAN22_EXPERT).eval(), build_transformer(TINY_WAN22_EXPERT).eval()
    with torch.no_grad():  # exactly representable in bf16, so lossless layouts match bit for bit
        for m in (high, low):
            for p in m.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    return high, low


def _same(a, b, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if atol:
            torch.testing.assert_close(sa[k].float(), sb[k].float(), atol=atol, rtol=0.07, msg=k)
        else:
            assert torch.equal(sa[k].float(), sb[k].float()), k


@pytest.mark.parametrize("layout", ["comfy_fp16", "comfy_fp8_scaled", "diffusers_pipeline"])
def test_both_experts_load_strictly(tmp_path, experts, layout):
    high, low = experts
    if layout == "comfy_fp16":
        args = (W.write_wan_original(high, str(tmp_path / "wan2.2_i2v_high_noise_14B_fp16.safetensors"),
                                     dtype=torch.float16, prefix=COMFY_PREFIX),
                W.write_wan_original(low, str(tmp_path / "wan2.2_i2v_low_noise_14B_fp16.safetensors"),
                                     dtype=torch.float16, prefix=COMFY_PREFIX))
    elif layout == "comfy_fp8_scaled":
        args = (W.write_wan_fp8_scaled(high, str(tmp_path / "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors")),
                W.write_wan_fp8_scaled(low, str(tmp_path / "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors")))
    else:  # Wan-AI/Wan2.2-I2V-A14B-Diffusers: transformer/ + transformer_2/
        W.write_wan_diffusers(high, str(tmp_path / "transformer"))
        W.write_wan_diffusers(low, str(tmp_path / "transformer_2"))
        args = (str(tmp_path),)
    a, b = load_wan22_experts(*args, dtype=torch.float32, num_heads=2)
    assert a.config.image_dim is None and a.config.added_kv_proj_dim is None and a.config.in_channels == 36
    atol = {"comfy_fp8_scaled": 0.05, "comfy_fp16": 1e-4}.get(layout, 0.0)  # fp16: subnormals of tiny weights
    _same(a, high, atol)
    _same(b, low, atol)
    if layout != "comfy_fp8_scaled":
        assert not torch.equal(a.blocks[0].attn2.to_q.weight, b.blocks[0].attn2.to_q.weight)  # not loaded twice


def test_expert_gguf_loads(tmp_path):
    pytest.importorskip("gguf")
    from fantasyportrait_core.model.build import TINY_TRANSFORMER

    torch.manual_seed(0)
    cfg = dict(TINY_TRANSFORMER, **dict(W.GGUF_TINY, image_dim=None, added_kv_proj_dim=None))
    paths = []
    for name in ("HighNoise", "LowNoise"):
        path = str(tmp_path / f"Wan2.2-I2V-A14B-{name}-Q4_K_M.gguf")
        W.write_wan_gguf(build_transformer(cfg).eval(), path)
        paths.append(path)
    a, b = load_wan22_experts(*paths, dtype=torch.float32)
    assert a.config.image_dim is None and type(a.blocks[0].attn1.to_q).__name__ == "GGUFLinear"
    with pytest.raises(CheckpointError, match="swapped"):
        load_wan22_experts(paths[1], paths[0], dtype=torch.float32)


def _one_line(e):
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_single_expert_same_file_or_wan21_are_one_line_errors(tmp_path, experts, tiny):
    high, low = experts
    h = W.write_wan_original(high, str(tmp_path / "wan2.2_i2v_high_noise_14B_fp16.safetensors"))
    lo = W.write_wan_original(low, str(tmp_path / "wan2.2_i2v_low_noise_14B_fp16.safetensors"))
    wan21 = W.write_wan_original(tiny[0], str(tmp_path / "wan2.1_i2v_480p_14B_fp16.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_wan22_experts(h)
    assert "needs two experts" in _one_line(e)
    with pytest.raises(CheckpointError) as e:
        load_wan22_experts(h, h)
    assert "same file for both experts" in _one_line(e)
    with pytest.raises(CheckpointError) as e:
        load_wan22_experts(lo, h)
    assert "swapped" in _one_line(e)
    with pytest.raises(CheckpointError) as e:
        load_wan22_experts(h, wan21, num_heads=2)
    assert "Wan2.1-I2V transformer (CLIP image branch), not a Wan2.2-I2V-A14B expert" in _one_line(e)
    # a diffusers folder with only transformer/ is one model
    W.write_wan_diffusers(high, str(tmp_path / "single" / "transformer"))
    with pytest.raises(CheckpointError) as e:
        load_wan22_experts(str(tmp_path / "single"))
    assert "no transformer_2" in _one_line(e)
    # one expert where Wan2.1 is expected names what to do
    with pytest.raises(CheckpointError) as e:
        load_transformer(h, num_heads=2)
    assert "one Wan2.2-I2V-A14B expert" in _one_line(e)

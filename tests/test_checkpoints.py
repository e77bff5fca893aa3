import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from fantasyportrait_core.weights.keys import COMFY_PREFIX, detect_transformer_format, wan_original_to_diffusers
from fantasyportrait_core.weights.files import CheckpointError
from fantasyportrait_core.weights.load import load_adapter, load_expression_encoder, load_transformer
from fantasyportrait_core.model.build import TINY_ADAPTER

from . import checkpoint_writers as W
from .conftest import REFERENCE


def _assert_same_weights(a, b, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        x, y = sa[k].float(), sb[k].float()
        assert x.shape == y.shape, k
        if atol == 0:
            assert torch.equal(x, y), k
        else:
            assert torch.allclose(x, y, atol=atol, rtol=0.07), k


@pytest.fixture(scope="module")
def bf16_transformer(tiny):
    # reference weights, exactly representable in bf16 so lossless formats must match bit for bit
    import copy

    m = copy.deepcopy(tiny[0])
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return m


@pytest.mark.parametrize("layout", ["original", "comfy_prefix", "original_shards", "diffusers_shards"])
def test_transformer_lossless_formats(tmp_path, bf16_transformer, layout):
    m = bf16_transformer
    if layout == "original":
        src = W.write_wan_original(m, str(tmp_path / "wan.safetensors"))
    elif layout == "comfy_prefix":
        src = W.write_wan_original(m, str(tmp_path / "wan.safetensors"), prefix=COMFY_PREFIX)
    elif layout == "original_shards":
        src = W.write_wan_original(m, str(tmp_path / "wan.safetensors"), shards=3)
    else:
        src = W.write_wan_diffusers(m, str(tmp_path / "transformer"))
    loaded = load_transformer(src, dtype=torch.float32, num_heads=2)
    _assert_same_weights(loaded, m)
    # the loaded model computes what the original does
    x = torch.randn(1, 36, 2, 4, 4)
    args = (x, torch.tensor([500.0]), torch.randn(1, 512, 32))
    kw = dict(encoder_hidden_states_image=torch.randn(1, 257, 16), return_dict=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args, **kw)[0], m(*args, **kw)[0])


@pytest.mark.parametrize("stored", [torch.float32, torch.float16])
def test_transformer_fp32_and_fp16_files(tmp_path, bf16_transformer, stored):
    """Files stored in fp32 / fp16 load to exactly the stored values (bf16 -> fp16 may round tiny
    weights, so the expectation is the stored tensor, not the model's)."""
    src = W.write_wan_original(bf16_transformer, str(tmp_path / "wan.safetensors"), dtype=stored)
    loaded = load_transformer(src, dtype=torch.float32, num_heads=2).state_dict()
    for k, v in bf16_transformer.state_dict().items():
        assert torch.equal(loaded[k], v.to(stored).float()), k


def test_transformer_bf16_keeps_fp32_modules(tmp_path, bf16_transformer):
    src = W.write_wan_original(bf16_transformer, str(tmp_path / "wan.safetensors"))
    m = load_transformer(src, dtype=torch.bfloat16, num_heads=2)
    sd = m.state_dict()
    assert sd["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    assert sd["blocks.0.scale_shift_table"].dtype == torch.float32
    assert sd["condition_embedder.time_embedder.linear_1.weight"].dtype == torch.float32


def test_transformer_fp8_formats(tmp_path, bf16_transformer):
    m = bf16_transformer
    fp8 = W.write_wan_original(m, str(tmp_path / "fp8.safetensors"), dtype=torch.float8_e4m3fn)
    scaled = W.write_wan_fp8_scaled(m, str(tmp_path / "fp8_scaled.safetensors"))
    assert detect_transformer_format(["scaled_fp8", "patch_embedding.weight", "blocks.0.self_attn.q.weight"])[2]
    a = load_transformer(fp8, dtype=torch.float32, num_heads=2)
    b = load_transformer(scaled, dtype=torch.float32, num_heads=2)
    ref = m.state_dict()
    for k, v in b.state_dict().items():
        # e4m3 has a 3-bit mantissa: relative rounding error <= 2^-4 (plus the scale's)
        assert torch.allclose(v.float(), ref[k].float(), rtol=0.07, atol=1e-3 * ref[k].abs().max().item() + 1e-6), k
    for k, v in a.state_dict().items():
        assert torch.allclose(v.float(), ref[k].float(), rtol=0.07, atol=2e-3), k
    # fp8 storage keeps linear weights in fp8, computes in bf16
    c = load_transformer(scaled, dtype=torch.bfloat16, storage_dtype=torch.float8_e4m3fn, num_heads=2)
    assert c.state_dict()["blocks.0.attn1.to_q.weight"].dtype == torch.float8_e4m3fn
    with torch.no_grad():
        out = c(torch.randn(1, 36, 2, 4, 4, dtype=torch.bfloat16), torch.tensor([500.0]),
                torch.randn(1, 512, 32, dtype=torch.bfloat16),
                encoder_hidden_states_image=torch.randn(1, 257, 16, dtype=torch.bfloat16), return_dict=False)[0]
    assert torch.isfinite(out).all()


def test_adapter_formats(tmp_path, tiny):
    _, adapter, _, encoder = tiny
    official = W.write_adapter_official(adapter, str(tmp_path / "fantasyportrait_model.ckpt"))
    repacked = W.write_adapter_repacked(adapter, str(tmp_path / "fp.safetensors"), encoder, dtype=torch.float32)
    hints = dict(resampler_heads=TINY_ADAPTER["resampler_heads"], resampler_dim_head=TINY_ADAPTER["resampler_dim_head"])
    a = load_adapter(official, dtype=torch.float32, **hints)
    b = load_adapter(repacked, dtype=torch.float32, **hints)
    _assert_same_weights(a, adapter)
    _assert_same_weights(b, adapter)
    feats = torch.randn(1, 5, 554)
    torch.testing.assert_close(a.expression_tokens(feats), adapter.expression_tokens(feats))
    # the encoder inside the repacked file
    _assert_same_weights(load_expression_encoder(repacked), encoder)


def test_expression_encoder_pth(tmp_path, tiny):
    enc = tiny[3]
    path = W.write_pd_fpg(enc, str(tmp_path / "pd_fpg.pth"))
    _assert_same_weights(load_expression_encoder(path), enc)
    # num_batches_tracked buffers may be absent in a real file
    sd = {k: v for k, v in enc.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, str(tmp_path / "nobt.pth"))
    load_expression_encoder(str(tmp_path / "nobt.pth"))


# ---------------------------------------------------------------------------- failures


def test_missing_extra_and_wrong_shape_keys(tmp_path, bf16_transformer):
    from fantasyportrait_core.weights.keys import transformer_state_dict_original

    sd = {k: v.contiguous() for k, v in transformer_state_dict_original(bf16_transformer).items()}
    cases = {
        "missing": {k: v for k, v in sd.items() if k != "blocks.1.ffn.2.weight"},
        "unexpected": {**sd, "blocks.0.extra.weight": torch.zeros(2)},
        "shape": {**sd, "blocks.0.self_attn.q.weight": torch.zeros(24, 23)},
    }
    for name, bad in cases.items():
        path = str(tmp_path / f"{name}.safetensors")
        save_file(bad, path)
        with pytest.raises(CheckpointError) as e:
            load_transformer(path, num_heads=2)
        msg = str(e.value)
        assert path in msg and "wan_original" in msg
        assert {"missing": "missing keys", "unexpected": "unexpected keys", "shape": "shape mismatch"}[name] in msg
        assert {"missing": "blocks.1.ffn.net.2.weight", "unexpected": "blocks.0.extra.weight",
                "shape": "blocks.0.attn1.to_q.weight"}[name] in msg


def test_truncated_safetensors(tmp_path, bf16_transformer):
    path = W.write_wan_original(bf16_transformer, str(tmp_path / "wan.safetensors"))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_transformer(path, num_heads=2)
    with open(path, "wb") as f:
        f.write(data[:20])
    with pytest.raises(CheckpointError, match="truncated|not a readable"):
        load_transformer(path, num_heads=2)


def test_truncated_pickle(tmp_path, tiny):
    path = W.write_adapter_official(tiny[1], str(tmp_path / "a.ckpt"))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read|truncated"):
        load_adapter(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused(tmp_path):
    path = str(tmp_path / "evil.ckpt")
    torch.save({"proj_model": {"norm.weight": torch.zeros(2)}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_adapter(path)
    raw = str(tmp_path / "evil.pth")
    with open(raw, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(CheckpointError):
        load_expression_encoder(raw)


def test_unknown_formats(tmp_path):
    p = str(tmp_path / "other.safetensors")
    save_file({"foo.weight": torch.zeros(2)}, p)
    with pytest.raises(CheckpointError, match="unknown format"):
        load_transformer(p)
    with pytest.raises(CheckpointError, match="unknown format"):
        load_adapter(p)
    with pytest.raises(CheckpointError, match="pd_fpg"):
        load_expression_encoder(p)
    q = str(tmp_path / "model.gguf")  # GGUF is a format now (tests/test_gguf.py); a broken one is named
    open(q, "wb").write(b"GGUF")
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        load_transformer(q)
    r = str(tmp_path / "model.onnx")
    open(r, "wb").write(b"\0")
    with pytest.raises(CheckpointError, match="extension"):
        load_transformer(r)
    with pytest.raises(CheckpointError, match="not found"):
        load_transformer(str(tmp_path / "nope.safetensors"))


@pytest.mark.skipif(not os.path.isdir(REFERENCE), reason="shared reference manifests not present")
def test_key_map_matches_published_manifest():
    with open(os.path.join(REFERENCE, "wan21_i2v_14b_diffusers_keys.json")) as f:
        mapping = json.load(f)["_original_to_diffusers"]
    assert len(mapping) == 1303
    assert all(wan_original_to_diffusers(k) == v for k, v in mapping.items())


def test_fp8_scaled_file_keeps_its_bits_with_fp8_storage(tmp_path, bf16_transformer):
    from safetensors import safe_open

    path = W.write_wan_fp8_scaled(bf16_transformer, str(tmp_path / "scaled.safetensors"))
    m = load_transformer(path, dtype=torch.float32, storage_dtype=torch.float8_e4m3fn, num_heads=2)
    lin = m.blocks[1].ffn.net[2]
    with safe_open(path, "pt") as f:
        stored = f.get_tensor(COMFY_PREFIX + "blocks.1.ffn.2.weight")
        scale = f.get_tensor(COMFY_PREFIX + "blocks.1.ffn.2.scale_weight")
    assert lin.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(lin.weight.view(torch.uint8), stored.view(torch.uint8))
    assert lin.scale.item() == scale.item()
    x = torch.randn(3, lin.in_features)
    ref = bf16_transformer.blocks[1].ffn.net[2](x)
    assert (lin(x) - ref).norm() / ref.norm() < 0.08


def test_scaled_fp8_beats_plain_cast_on_small_weights():
    from fantasyportrait_core.model.fp8 import ScaledFP8Linear, quantize_fp8

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 512, generator=g)
    errors = {}
    for std in (0.02, 0.005):  # the smaller the weights, the more of them fall into e4m3's subnormals
        w = torch.randn(512, 512, generator=g) * std
        ref = x @ w.T
        lin = ScaledFP8Linear(512, 512, bias=False)
        lin.weight.data, lin.scale.data = quantize_fp8(w)
        errors[std] = ((lin(x) - ref).norm() / ref.norm(),
                       (x @ w.to(torch.float8_e4m3fn).float().T - ref).norm() / ref.norm())
    for scaled, plain in errors.values():
        assert scaled < 0.04 and scaled < plain  # scaled error does not depend on the weights' size
    assert errors[0.005][1] > 3 * errors[0.005][0]


@pytest.mark.parametrize("with_index", [True, False])
def test_any_shard_loads_the_whole_set(tmp_path, bf16_transformer, with_index):
    """ComfyUI lists each shard as a model file: picking shard 2 of 3 must load all three."""
    if with_index:  # diffusers layout: the index json names the set
        folder = W.write_wan_diffusers(bf16_transformer, str(tmp_path / "transformer"), shards=3)
        shard = os.path.join(folder, "diffusion_pytorch_model-00002-of-00003.safetensors")
    else:  # original keys, numbered shards, no index
        shard = W.write_wan_original(bf16_transformer, str(tmp_path / "wan.safetensors"), shards=3)[1]
    _assert_same_weights(load_transformer(shard, dtype=torch.float32, num_heads=2), bf16_transformer)
    os.remove(shard.replace("-00002-of-", "-00003-of-"))
    with pytest.raises(CheckpointError, match=r"-00003-of-00003\.safetensors is missing"):
        load_transformer(shard, dtype=torch.float32, num_heads=2)

"""Write tiny checkpoints in every published layout (exact key names, tiny dims) for the tests.

The writers benchmarks and scripts also need live in :mod:`fantasyportrait_core.weights.tiny`
(imported here); the ones only tests need (fp8 scaled, diffusers shards, official adapter pickle,
GGUF, the by-hand LoRA merge oracle) stay here."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from fantasyportrait_core.weights.keys import COMFY_PREFIX, transformer_state_dict_original
from fantasyportrait_core.weights.tiny import (LORA_LAYERS, TINY_NATIVE_TRANSFORMER, tiny_native_wan22_experts,  # noqa: F401
                                                   contiguous_state_dict,
                                                   tiny_native_models, write_adapter_repacked, write_pd_fpg,
                                                   write_wan_lora, write_wan_original)


def write_wan_fp8_scaled(model, path):
    """"fp8 scaled" layout: per-tensor ``scale_weight`` for every 2-D weight + a ``scaled_fp8`` marker."""
    sd = {}
    for k, v in transformer_state_dict_original(model).items():
        if v.ndim == 2 and k.endswith(".weight"):
            scale = v.abs().max().float().clamp(min=1e-8) / 448.0
            sd[COMFY_PREFIX + k] = (v.float() / scale).to(torch.float8_e4m3fn)
            sd[COMFY_PREFIX + k[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
        else:
            sd[COMFY_PREFIX + k] = v.to(torch.bfloat16)
    sd[COMFY_PREFIX + "scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    save_file(contiguous_state_dict(sd), path)
    return path


def write_wan_diffusers(model, folder, shards=2):
    """diffusers layout: ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` + index json."""
    os.makedirs(folder, exist_ok=True)
    sd = model.state_dict()
    keys = sorted(sd)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::shards]}
        save_file(contiguous_state_dict(part), os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return folder


def adapter_state_dict_official(adapter) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter's weights in the official ``fantasyportrait_model.ckpt`` layout."""
    out = {g: {} for g in ("proj_model", "mouth_proj_model", "emo_proj_model", "ip_adapter")}
    for k, v in adapter.state_dict().items():
        group, rest = k.split(".", 1)
        if group == "ip_adapter":
            rest = rest.replace(".cross_attn.", ".cross_attn.processor.")
        out[group][rest] = v
    return out


def write_adapter_official(adapter, path):
    torch.save(adapter_state_dict_official(adapter), path)
    return path


def merge_lora_by_hand(model, expected, strength=1.0):
    """``model`` with ``W + s·(alpha/rank)·B·A``, ``b + s·diff_b`` and ``p + s·diff`` written into its
    weights: the oracle the LoRA tests compare against."""
    with torch.no_grad():
        for layer, (a, b, scale, db) in expected["layers"].items():
            lin = model.get_submodule(layer)
            lin.weight += strength * scale * (b.double() @ a.double()).to(lin.weight.dtype)
            if db is not None:
                lin.bias += strength * db.to(lin.bias.dtype)
        for name, d in expected["diffs"].items():
            p = model.get_parameter(name)
            p += strength * d.to(p.dtype)
    return model


# --------------------------------------------------------------------------------------------
# GGUF as city96 publishes Wan2.1 I2V (tools/convert.py: arch "wan", original keys without the
# ``model.diffusion_model.`` prefix, 1-D tensors and ``.modulation`` in F32, the 5-D
# ``patch_embedding.weight`` added back in F32 by tools/fix_5d_tensors.py).

GGUF_TINY = dict(num_attention_heads=2, attention_head_dim=128, ffn_dim=512, text_dim=256, freq_dim=256,
                 image_dim=256, added_kv_proj_dim=256)  # every linear input a multiple of 256 (Q4_K blocks)


def _random_q4_k(rows: int, cols: int, g: torch.Generator):
    """Valid random Q4_K bytes (gguf-py can dequantise Q4_K but not quantise it): per 256 values one
    144-byte block = fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of 4-bit quants."""
    import numpy as np

    n = rows * cols // 256
    d = (torch.rand(n, 1, generator=g) * 2e-3 + 1e-3).half().numpy().view(np.uint8)
    dmin = (torch.rand(n, 1, generator=g) * 1e-3).half().numpy().view(np.uint8)
    rest = torch.randint(0, 256, (n, 140), generator=g, dtype=torch.uint8).numpy()
    return np.concatenate([d, dmin, rest], axis=1).reshape(rows, cols // 256 * 144)


def write_wan_gguf(model, path, seed=0):
    """city96-style GGUF of ``model``: Q8_0 for most 2-D weights, random Q4_K for the ffn and self-attention
    query weights, F16 for the text embedding, F32 for the rest.

    Returns:
        ``(dequantised, qtypes)``: the weights the file holds, dequantised by gguf-py's own numpy code
        (original key names, float32), and each key's GGML type name.
    """
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    g = torch.Generator().manual_seed(seed)
    writer = gguf.GGUFWriter(path=None, arch="wan")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    dequantised, qtypes = {}, {}
    for key, value in transformer_state_dict_original(model).items():
        a = value.detach().float().numpy()
        if a.ndim == 2 and a.shape[1] % 256 == 0 and (".ffn.0." in key or ".self_attn.q." in key):
            qtype, data = Q.Q4_K, _random_q4_k(a.shape[0], a.shape[1], g)
        elif a.ndim == 2 and key.startswith("text_embedding."):
            qtype, data = Q.F16, a.astype(np.float16)
        elif a.ndim == 2 and a.shape[1] % 32 == 0 and ".modulation" not in key:
            qtype, data = Q.Q8_0, gguf.quants.quantize(a, Q.Q8_0)
        else:
            qtype, data = Q.F32, a
        writer.add_tensor(key, data, raw_dtype=qtype)
        raw = data if qtype in (Q.F32, Q.F16) else gguf.quants.dequantize(data, qtype)
        dequantised[key] = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32)).reshape(value.shape)
        qtypes[key] = qtype.name
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dequantised, qtypes

"""Write tiny checkpoints in every published layout (exact key names, tiny dims) for the tests."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from fantasyportrait_core.checkpoints import (COMFY_PREFIX, adapter_state_dict_official,
                                              transformer_state_dict_original)


def _contig(sd):
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def write_wan_original(model, path, dtype=torch.bfloat16, prefix="", shards=1):
    """Original Wan key names; ``prefix=COMFY_PREFIX`` for the Comfy-Org repack; ``shards`` files."""
    sd = {prefix + k: v.to(dtype) for k, v in transformer_state_dict_original(model).items()}
    keys = sorted(sd)
    paths = []
    for i in range(shards):
        part = {k: sd[k] for k in keys[i::shards]}
        p = path if shards == 1 else path.replace(".safetensors", f"-{i + 1:05d}-of-{shards:05d}.safetensors")
        save_file(_contig(part), p)
        paths.append(p)
    return paths if shards > 1 else path


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
    save_file(_contig(sd), path)
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
        save_file(_contig(part), os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return folder


def write_adapter_official(adapter, path):
    torch.save(adapter_state_dict_official(adapter), path)
    return path


def write_adapter_repacked(adapter, path, encoder=None, dtype=torch.float16):
    sd = {k: v.to(dtype) for k, v in adapter.state_dict().items()}
    if encoder is not None:
        sd.update({"pd_fpg." + k: v for k, v in encoder.state_dict().items()})
    save_file(_contig(sd), path)
    return path


def write_pd_fpg(encoder, path):
    torch.save(encoder.state_dict(), path)
    return path


# The smallest Wan2.1-I2V transformer ComfyUI's model detection takes as Wan2.1 I2V
# (comfy/model_detection.py fixes head size 128, freq_dim 256, umT5 width 4096 and CLIP-H width
# 1280): 2 heads (width 256), 2 blocks. Used for the native-MODEL tests and the real-ComfyUI check.
def _tiny_native_config():
    from fantasyportrait_core.models import WAN21_I2V_14B

    return dict(WAN21_I2V_14B, num_attention_heads=2, attention_head_dim=128, ffn_dim=64, num_layers=2,
                added_kv_proj_dim=256)


TINY_NATIVE_TRANSFORMER = _tiny_native_config()


def tiny_native_models(seed: int = 0):
    """(transformer, adapter) in :data:`TINY_NATIVE_TRANSFORMER` sizes with seeded random weights; the
    adapter's K/V projections get small random values (zero in a fresh adapter) so the portrait
    branch moves the output."""
    from fantasyportrait_core.models import TINY_ADAPTER, build_adapter, build_transformer

    torch.manual_seed(seed)
    transformer = build_transformer(TINY_NATIVE_TRANSFORMER).eval()
    adapter = build_adapter(TINY_NATIVE_TRANSFORMER, **TINY_ADAPTER).eval()
    for block in adapter.ip_adapter.blocks:
        for lin in (block.cross_attn.ip_adapter_single_stream_k_proj, block.cross_attn.ip_adapter_single_stream_v_proj):
            torch.nn.init.normal_(lin.weight, std=0.2)
    return transformer, adapter

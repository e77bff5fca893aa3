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
# --------------------------------------------------------------------------------------------
# LoRAs in the published layouts (tiny dims, real key names). The name table is written out here,
# independently of fantasyportrait_core's key maps, so the tests check those maps too.

LORA_LAYERS = {  # original Wan module -> diffusers module, per block (N)
    "blocks.N.self_attn.q": "blocks.N.attn1.to_q",
    "blocks.N.self_attn.o": "blocks.N.attn1.to_out.0",
    "blocks.N.cross_attn.k": "blocks.N.attn2.to_k",
    "blocks.N.cross_attn.k_img": "blocks.N.attn2.add_k_proj",
    "blocks.N.cross_attn.v_img": "blocks.N.attn2.add_v_proj",
    "blocks.N.ffn.0": "blocks.N.ffn.net.0.proj",
    "blocks.N.ffn.2": "blocks.N.ffn.net.2",
}


def write_wan_lora(model, path, layout="diffusion_model", rank=4, alpha=2.0, seed=0, blocks=(0, 1), lightx2v=False,
                   unmatched=()):
    """Write a random LoRA for ``model`` in a published layout; return what it must do to the model.

    layouts: ``diffusion_model`` (``diffusion_model.blocks.N.self_attn.q.lora_down.weight`` +
    ``.alpha``), ``diffusion_model_AB`` (``lora_A``/``lora_B``), ``lora_unet`` (kohya/musubi
    ``lora_unet_blocks_N_self_attn_q.lora_down.weight``), ``original`` (no prefix), ``diffusers``
    (``transformer.blocks.N.attn1.to_q.lora_A.weight``, alpha folded). ``lightx2v`` adds its extra keys:
    ``diff_b`` per layer, full ``diff`` for norms and ``head.head``, ``blocks.N.diff_m`` (modulation).
    ``unmatched`` keys are written as given (zeros).

    Returns:
        ``{"layers": {diffusers layer: (A [r, in], B [out, r], alpha / rank, diff_b or None)},
        "diffs": {diffusers parameter: delta}}``.
    """
    g = torch.Generator().manual_seed(seed)
    sd, layers, diffs = {}, {}, {}
    for n in blocks:
        for orig, diff_name in LORA_LAYERS.items():
            orig, diff_name = orig.replace("N", str(n)), diff_name.replace("N", str(n))
            lin = model.get_submodule(diff_name)
            a = torch.randn(rank, lin.in_features, generator=g) * 0.1
            b = torch.randn(lin.out_features, rank, generator=g) * 0.1
            db = torch.randn(lin.out_features, generator=g) * 0.01 if lightx2v else None
            scale = alpha / rank if layout != "diffusers" and not lightx2v else 1.0
            layers[diff_name] = (a, b, scale, db)
            if layout == "diffusers":
                sd[f"transformer.{diff_name}.lora_A.weight"] = a
                sd[f"transformer.{diff_name}.lora_B.weight"] = b
                continue
            if layout == "lora_unet":
                stem = "lora_unet_" + orig.replace(".", "_")
            else:
                stem = ("" if layout == "original" else "diffusion_model.") + orig
            down, up = ("lora_A", "lora_B") if layout == "diffusion_model_AB" else ("lora_down", "lora_up")
            sd[f"{stem}.{down}.weight"] = a
            sd[f"{stem}.{up}.weight"] = b
            if not lightx2v:
                sd[f"{stem}.alpha"] = torch.tensor(alpha)
            if db is not None:
                sd[f"{stem}.diff_b"] = db
        if lightx2v:
            for orig, param in ((f"blocks.{n}.norm3", f"blocks.{n}.norm2.weight"),
                                (f"blocks.{n}.self_attn.norm_q", f"blocks.{n}.attn1.norm_q.weight"),
                                (f"blocks.{n}.cross_attn.norm_k_img", f"blocks.{n}.attn2.norm_added_k.weight")):
                d = torch.randn(model.get_parameter(param).shape, generator=g) * 0.01
                sd[f"diffusion_model.{orig}.diff"] = d
                diffs[param] = d
            d = torch.randn(model.get_parameter(f"blocks.{n}.scale_shift_table").shape, generator=g) * 0.01
            sd[f"diffusion_model.blocks.{n}.diff_m"] = d
            diffs[f"blocks.{n}.scale_shift_table"] = d
    if lightx2v:
        for key, param in (("head.head.diff", "proj_out.weight"), ("head.head.diff_b", "proj_out.bias")):
            d = torch.randn(model.get_parameter(param).shape, generator=g) * 0.01
            sd[f"diffusion_model.{key}"] = d
            diffs[param] = d
    for key in unmatched:
        sd[key] = torch.zeros(rank, 8)
    save_file(_contig(sd), path)
    return {"layers": layers, "diffs": diffs}


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

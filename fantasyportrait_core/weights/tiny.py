"""Small checkpoints with the exact published key names, written from a (tiny, random) model: what
the benchmarks, the demos and the real-ComfyUI check load without any download.

* :func:`write_wan_original`: Wan2.1 transformer, original key names (``prefix=COMFY_PREFIX``: the
  Comfy-Org repack), optionally sharded;
* :func:`write_adapter_repacked`: the repacked FantasyPortrait adapter ``.safetensors`` (optionally
  with the ``pd_fpg.*`` PD-FGC keys); :func:`write_pd_fpg`: ``pd_fpg.pth``;
* :func:`write_wan_lora`: a random LoRA in a published layout (incl. lightx2v's ``diff``/``diff_b``);
* :func:`tiny_native_models`: the smallest transformer ComfyUI's model detection takes as Wan2.1 I2V.

Key names: ``../shared/reference/*.json`` (published files) and the Wan2.1 / FantasyPortrait releases.
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from fantasyportrait_core.weights.keys import transformer_state_dict_original


def contiguous_state_dict(sd):
    """Contiguous, detached copies (what ``save_file`` needs)."""
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def write_wan_original(model, path, dtype=torch.bfloat16, prefix="", shards=1):
    """Original Wan key names; ``prefix=COMFY_PREFIX`` for the Comfy-Org repack; ``shards`` files."""
    sd = {prefix + k: v.to(dtype) for k, v in transformer_state_dict_original(model).items()}
    keys = sorted(sd)
    paths = []
    for i in range(shards):
        part = {k: sd[k] for k in keys[i::shards]}
        p = path if shards == 1 else path.replace(".safetensors", f"-{i + 1:05d}-of-{shards:05d}.safetensors")
        save_file(contiguous_state_dict(part), p)
        paths.append(p)
    return paths if shards > 1 else path


def write_adapter_repacked(adapter, path, encoder=None, dtype=torch.float16):
    """The adapter's state dict in ``dtype`` (plus ``pd_fpg.*`` from ``encoder``) as one safetensors file."""
    sd = {k: v.to(dtype) for k, v in adapter.state_dict().items()}
    if encoder is not None:
        sd.update({"pd_fpg." + k: v for k, v in encoder.state_dict().items()})
    save_file(contiguous_state_dict(sd), path)
    return path


def write_pd_fpg(encoder, path):
    """PD-FGC ``FanEncoder`` weights as ``pd_fpg.pth`` (a plain state dict, as released)."""
    torch.save(encoder.state_dict(), path)
    return path


# The smallest Wan2.1-I2V transformer ComfyUI's model detection takes as Wan2.1 I2V
# (comfy/model_detection.py fixes head size 128, freq_dim 256, umT5 width 4096 and CLIP-H width
# 1280): 2 heads (width 256), 2 blocks. Used for the native-MODEL tests and the real-ComfyUI check.
def _tiny_native_config():
    from fantasyportrait_core.model.build import WAN21_I2V_14B

    return dict(WAN21_I2V_14B, num_attention_heads=2, attention_head_dim=128, ffn_dim=64, num_layers=2,
                added_kv_proj_dim=256)


TINY_NATIVE_TRANSFORMER = _tiny_native_config()
# One Wan2.2-I2V-A14B expert in those sizes: ComfyUI's detection types it WAN21_T2V (no img_emb) with
# in_dim 36, as it does the released experts.
TINY_NATIVE_WAN22_EXPERT = dict(TINY_NATIVE_TRANSFORMER, image_dim=None, added_kv_proj_dim=None)


def tiny_native_wan22_experts(seed: int = 0):
    """(high-noise, low-noise) experts in :data:`TINY_NATIVE_WAN22_EXPERT` sizes, seeded random weights
    (different per expert); write them with :func:`write_wan_original` (``prefix=COMFY_PREFIX`` for the
    Comfy-Org repack layout)."""
    from fantasyportrait_core.model.build import build_transformer

    torch.manual_seed(seed)
    return build_transformer(TINY_NATIVE_WAN22_EXPERT).eval(), build_transformer(TINY_NATIVE_WAN22_EXPERT).eval()


def tiny_native_models(seed: int = 0):
    """(transformer, adapter) in :data:`TINY_NATIVE_TRANSFORMER` sizes with seeded random weights; the
    adapter's K/V projections get small random values (zero in a fresh adapter) so the portrait
    branch moves the output."""
    from fantasyportrait_core.model.build import TINY_ADAPTER, build_adapter, build_transformer

    torch.manual_seed(seed)
    transformer = build_transformer(TINY_NATIVE_TRANSFORMER).eval()
    adapter = build_adapter(TINY_NATIVE_TRANSFORMER, **TINY_ADAPTER).eval()
    for block in adapter.ip_adapter.blocks:
        for lin in (block.cross_attn.ip_adapter_single_stream_k_proj, block.cross_attn.ip_adapter_single_stream_v_proj):
            torch.nn.init.normal_(lin.weight, std=0.2)
    return transformer, adapter
# --------------------------------------------------------------------------------------------
# LoRAs in the published layouts (tiny dims, real key names). The name table is written out here,
# independently of the key maps in lora.py / keys.py, so the tests check those maps too.

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
    save_file(contiguous_state_dict(sd), path)
    return {"layers": layers, "diffs": diffs}


__all__ = ["LORA_LAYERS", "TINY_NATIVE_TRANSFORMER", "contiguous_state_dict", "tiny_native_models", "write_adapter_repacked", "write_pd_fpg",
           "write_wan_lora", "write_wan_original"]


def flashportrait_state_dicts(transformer, adapter) -> tuple[dict, dict]:
    """(``transformer.pt`` dict, ``portrait_encoder.pt`` dict) of a FlashPortrait release built from our
    modules: the DiT under original Wan names plus ``blocks.N.cross_attn.emo_{k,v}_proj.weight`` (the
    adapter's per-block K/V), and the adapter's token path (``proj_model.*``, ``mouth_proj_model.*``,
    ``emo_proj_model.*``). Key names: ``tests/data/flashportrait_*_keys.json`` (FlashPortrait c72d9de)."""
    dit = dict(transformer_state_dict_original(transformer))
    for i in range(adapter.num_layers):
        k, v = adapter.kv_projections(i)
        dit[f"blocks.{i}.cross_attn.emo_k_proj.weight"] = k.weight
        dit[f"blocks.{i}.cross_attn.emo_v_proj.weight"] = v.weight
    enc = {k: v for k, v in adapter.state_dict().items() if not k.startswith("ip_adapter.")}
    return dit, enc


def write_flashportrait(transformer, adapter, folder, layout="released", encoder=None, dtype=torch.bfloat16,
                        prefix=""):
    """Write a tiny FlashPortrait checkpoint set.

    Args:
        layout: ``"released"``: ``transformer.pt`` + ``portrait_encoder.pt`` (+ ``pd_fpg.pth`` from
            ``encoder``) as ``torch.save`` dicts, unprefixed (``bin_convert_pt.py``); ``"single_file"``:
            one ``flashportrait.safetensors`` with the DiT keys (under ``prefix``), the encoder groups and
            ``pd_fpg.*``.
    Returns:
        ``{"transformer": path, "adapter": path, "pd_fpg": path or None}``.
    """
    import os

    dit, enc = flashportrait_state_dicts(transformer, adapter)
    os.makedirs(folder, exist_ok=True)
    if layout == "released":
        t_path, a_path = os.path.join(folder, "transformer.pt"), os.path.join(folder, "portrait_encoder.pt")
        torch.save(contiguous_state_dict({k: v.to(dtype) for k, v in dit.items()}), t_path)
        torch.save(contiguous_state_dict(enc), a_path)
        p_path = write_pd_fpg(encoder, os.path.join(folder, "pd_fpg.pth")) if encoder is not None else None
        return {"transformer": t_path, "adapter": a_path, "pd_fpg": p_path}
    if layout != "single_file":
        raise ValueError(f"layout must be 'released' or 'single_file', got {layout!r}")
    sd = {prefix + k: v.to(dtype) for k, v in dit.items()}
    sd.update({k: v.to(dtype) for k, v in enc.items()})
    if encoder is not None:
        sd.update({"pd_fpg." + k: v for k, v in encoder.state_dict().items()})
    path = os.path.join(folder, "flashportrait.safetensors")
    save_file(contiguous_state_dict(sd), path)
    return {"transformer": path, "adapter": path, "pd_fpg": path if encoder is not None else None}

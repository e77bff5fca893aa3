"""Checkpoint key names: original Wan <-> diffusers ``WanTransformer3DModel`` renames, detection of a
transformer checkpoint's layout from its keys, and the FantasyPortrait adapter's key map (official
``.ckpt`` and repacked layouts). Published names: ``../shared/reference/*_keys.json``.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

from fantasyportrait_core.weights.files import CheckpointError

COMFY_PREFIX = "model.diffusion_model."

# Original Wan -> diffusers WanTransformer3DModel names (the rules of diffusers'
# ``convert_wan_transformer_to_diffusers``; note original norm3 is diffusers norm2). One table per
# level; the inverse map swaps each table.
_TOP = {  # whole-key prefixes outside the blocks
    "text_embedding.0.": "condition_embedder.text_embedder.linear_1.",
    "text_embedding.2.": "condition_embedder.text_embedder.linear_2.",
    "time_embedding.0.": "condition_embedder.time_embedder.linear_1.",
    "time_embedding.2.": "condition_embedder.time_embedder.linear_2.",
    "time_projection.1.": "condition_embedder.time_proj.",
    "img_emb.proj.0.": "condition_embedder.image_embedder.norm1.",
    "img_emb.proj.1.": "condition_embedder.image_embedder.ff.net.0.proj.",
    "img_emb.proj.3.": "condition_embedder.image_embedder.ff.net.2.",
    "img_emb.proj.4.": "condition_embedder.image_embedder.norm2.",
    "head.head.": "proj_out.",
    "head.modulation": "scale_shift_table",
}
_BLOCK = {  # first part of a key inside blocks.N.
    "modulation": "scale_shift_table", "self_attn": "attn1", "cross_attn": "attn2", "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
_ATTN = {  # first part inside an attention module
    "q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "k_img": "add_k_proj", "v_img": "add_v_proj",
    "norm_k_img": "norm_added_k",
}
_BLOCK_KEY = re.compile(r"^(blocks\.\d+\.)(.+)$")


def _rename_prefix(key: str, table: dict[str, str]) -> str:
    for src in sorted(table, key=len, reverse=True):  # longest match first
        if key == src or key.startswith(src if src.endswith(".") else src + "."):
            return table[src] + key[len(src):]
    return key


def _rename(key: str, forward: bool) -> str:
    top, block, attn = ((_TOP, _BLOCK, _ATTN) if forward else
                        tuple({v: k for k, v in t.items()} for t in (_TOP, _BLOCK, _ATTN)))
    m = _BLOCK_KEY.match(key)
    if m is None:
        return _rename_prefix(key, top)
    head, rest = m.groups()
    rest = _rename_prefix(rest, block)
    module, _, tail = rest.partition(".")
    if module in ("attn1", "attn2", "self_attn", "cross_attn") and tail:
        rest = f"{module}.{_rename_prefix(tail, attn)}"
    return head + rest


def wan_original_to_diffusers(key: str) -> str:
    """Map one original-Wan transformer key to its diffusers name."""
    return _rename(key, forward=True)


def wan_diffusers_to_original(key: str) -> str:
    """Map one diffusers Wan transformer key to its original-Wan name."""
    return _rename(key, forward=False)


def detect_transformer_format(keys: Iterable[str]) -> tuple[str, str, bool]:
    """(format, prefix, fp8_scaled) of a Wan transformer state dict from its key names.

    format is ``"wan_original"`` or ``"wan_diffusers"``.

    Raises:
        CheckpointError: when the keys are neither (names a few keys seen).
    """
    keys = list(keys)
    prefix = COMFY_PREFIX if any(k.startswith(COMFY_PREFIX) for k in keys) else ""
    body = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    scaled = "scaled_fp8" in keys or "scaled_fp8" in body or any(k.endswith(".scale_weight") for k in body)
    if "patch_embedding.weight" in body and any(".self_attn.q.weight" in k for k in body):
        return "wan_original", prefix, scaled
    if "patch_embedding.weight" in body and any(".attn1.to_q.weight" in k for k in body):
        return "wan_diffusers", prefix, scaled
    raise CheckpointError(f"not a Wan2.1 transformer checkpoint (unknown format); first keys: {keys[:5]}")



def transformer_state_dict_original(model) -> dict[str, torch.Tensor]:
    """A diffusers Wan transformer's weights under original Wan key names (for exporting and for
    writing test checkpoints). Raises CheckpointError if a key has no original name."""
    out = {}
    for k, v in model.state_dict().items():
        orig = wan_diffusers_to_original(k)
        if wan_original_to_diffusers(orig) != k:
            raise CheckpointError(f"no original-Wan name for {k}")
        out[orig] = v
    return out



def adapter_key_map(keys: list[str]) -> tuple[str, dict[str, str]]:
    """(format, target->source) for the official or repacked adapter keys (``pd_fpg.*`` ignored)."""
    groups = ("proj_model.", "mouth_proj_model.", "emo_proj_model.")
    key_map = {}
    fmt = None
    ip = re.compile(r"^ip_adapter\.blocks\.(\d+)\.cross_attn\.(processor\.)?(ip_adapter_single_stream_[kv]_proj\.weight)$")
    for k in keys:
        if k.startswith(groups):
            key_map[k] = k
            continue
        m = ip.match(k)
        if m:
            fmt = "official ckpt" if m.group(2) else "repacked"
            key_map[f"ip_adapter.blocks.{m.group(1)}.cross_attn.{m.group(3)}"] = k
        elif k.startswith("pd_fpg."):
            continue
        else:
            key_map[k] = k  # reported as unexpected by the strict check
    if fmt is None or not any(k.startswith("proj_model.") for k in key_map):
        raise CheckpointError(f"not a FantasyPortrait adapter checkpoint (unknown format); first keys: {keys[:5]}")
    return fmt, key_map



# --------------------------------------------------------------------------------------------
# FlashPortrait (Francis-Rings/FlashPortrait @ c72d9de; manifests: tests/data/flashportrait_*_keys.json)
#
# Released files: ``transformer.pt`` = the whole fine-tuned Wan2.1-I2V DiT, original Wan keys, no
# prefix, plus ``blocks.N.cross_attn.emo_{k,v}_proj.weight`` ``[dim, 2048]`` (no bias);
# ``portrait_encoder.pt`` = ``proj_model.*``, ``mouth_proj_model.*``, ``emo_proj_model.*`` (FantasyPortrait's
# names); ``pd_fpg.pth`` as FantasyPortrait's. Single-file safetensors repack (ours, like the
# FantasyPortrait repack): the DiT keys (optionally under ``model.diffusion_model.``) with the
# ``emo_{k,v}_proj`` weights, plus the encoder groups and optionally ``pd_fpg.*``, in one file.

FLASH_KV_KEY = re.compile(r"^(?:model\.diffusion_model\.)?blocks\.(\d+)\.cross_attn\.emo_([kv])_proj\.weight$")
ENCODER_GROUPS = ("proj_model.", "mouth_proj_model.", "emo_proj_model.")
_WAN_TOP = ("patch_embedding.", "text_embedding.", "time_embedding.", "time_projection.", "blocks.", "head.", "img_emb.",
            "condition_embedder.", "proj_out.", "scale_shift_table", "rope.", "scaled_fp8")


def portrait_family(keys: Iterable[str]) -> str | None:
    """Which portrait model a checkpoint's keys belong to: ``"flashportrait"`` when any block has
    FlashPortrait's ``cross_attn.emo_k_proj.weight``, ``"fantasyportrait"`` for FantasyPortrait's
    ``ip_adapter.*`` K/V, ``"flashportrait encoder"`` for encoder groups without any K/V (FlashPortrait's
    ``portrait_encoder.pt``), else ``None`` (a plain Wan transformer or something else)."""
    keys = list(keys)
    if any(FLASH_KV_KEY.match(k) for k in keys):
        return "flashportrait"
    if any(k.startswith("ip_adapter.") for k in keys):
        return "fantasyportrait"
    if any(k.startswith(ENCODER_GROUPS) for k in keys):
        return "flashportrait encoder"
    return None


def is_transformer_key(key: str, prefix: str = "") -> bool:
    """True for a Wan DiT key (after ``prefix``) other than FlashPortrait's ``emo_{k,v}_proj``: the
    keys a single-file FlashPortrait repack carries for the transformer loader."""
    return key.startswith(prefix) and key[len(prefix):].startswith(_WAN_TOP) and not FLASH_KV_KEY.match(key)


def is_portrait_key(key: str) -> bool:
    """True for the portrait side of a FlashPortrait file (``emo_{k,v}_proj``, encoder groups,
    ``pd_fpg.*``): keys the transformer loader leaves to the adapter / expression-encoder loaders."""
    return bool(FLASH_KV_KEY.match(key)) or key.startswith(ENCODER_GROUPS + ("pd_fpg.",))


def flash_kv_key_map(keys: Iterable[str]) -> dict[str, str]:
    """FlashPortrait's per-block K/V -> the adapter's K/V slots: ``{adapter key: file key}`` with
    ``blocks.N.cross_attn.emo_k_proj.weight -> ip_adapter.blocks.N.cross_attn.ip_adapter_single_stream_k_proj.weight``
    (same for v). Empty when the keys hold none."""
    out = {}
    for k in keys:
        m = FLASH_KV_KEY.match(k)
        if m:
            out[f"ip_adapter.blocks.{m.group(1)}.cross_attn.ip_adapter_single_stream_{m.group(2)}_proj.weight"] = k
    return out

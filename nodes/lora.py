"""FantasyPortrait LoRA node: adds a Wan2.1 LoRA (style, character, lightx2v step distill) to a
FANTASYPORTRAIT_MODEL; chain several."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import OrderedDict

from fantasyportrait_core.weights.lora import LoraWeights, read_lora

from . import host

log = logging.getLogger("FantasyPortrait")

_CACHE: OrderedDict[tuple[int, str], LoraWeights] = OrderedDict()  # (transformer id, file key) -> converted LoRA
_CACHE_SIZE = 8


def cached_lora(path: str, transformer) -> LoraWeights:
    """:func:`~fantasyportrait_core.weights.lora.read_lora`, remembered per transformer and file version (path,
    size, mtime), so changing only the strength or requeueing does not re-read the file."""
    st = os.stat(path)
    key = (id(transformer), f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}")
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    weights = read_lora(path, transformer)
    _CACHE[key] = weights
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return weights


class FantasyPortraitLoRA:
    """A Wan2.1 LoRA on the FantasyPortrait model (applied by the sampler, removed exactly when a later
    prompt does not use it)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("FANTASYPORTRAIT_MODEL", {"tooltip": "From FantasyPortrait Model Loader or another LoRA node."}),
            "lora_name": (host.list_models("loras"), {
                "tooltip": "A Wan2.1 (14B, I2V or T2V) LoRA from models/loras: ComfyUI/kijai/lightx2v "
                           "(diffusion_model.*), kohya/musubi (lora_unet_*), diffusers or PEFT files. For 4-step "
                           "sampling use lightx2v's step-distill LoRA with the sampler's lightx2v preset."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05,
                                   "tooltip": "LoRA strength s in W + s·(alpha/rank)·B·A; 0 = off."}),
        }}

    RETURN_TYPES = ("FANTASYPORTRAIT_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same model with this LoRA added (chain more LoRA nodes to stack them).",)
    FUNCTION = "apply"
    CATEGORY = "FantasyPortrait/loaders"
    DESCRIPTION = ("Adds a Wan2.1 LoRA to the FantasyPortrait model. Keys of the file that match no layer of the "
                   "transformer are reported in the console by name and count.")

    def apply(self, model, lora_name, strength=1.0):
        if strength == 0:
            return (model,)
        weights = cached_lora(host.model_path("loras", lora_name), model.transformer)
        return (dataclasses.replace(model, loras=tuple(model.loras) + ((weights, float(strength)),)),)

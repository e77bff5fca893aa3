"""The FantasyPortrait transformer as a model ComfyUI's memory management knows about.

ComfyUI frees VRAM for a model by unloading the models in its list (``current_loaded_models``);
a model outside that list is invisible to it: it is neither freed for others nor kept for the next
prompt. :class:`ComfyResident` is a small stand-in for ComfyUI's ``ModelPatcher`` (the methods
``LoadedModel`` calls) so that ``comfy.model_management.load_models_gpu`` first unloads what ComfyUI
holds to make room for the transformer and the activations, then keeps the transformer on the GPU
between queued prompts until ComfyUI needs the memory for something else (VAE decode, text
encoders of the next prompt), when it calls :meth:`ComfyResident.detach`. Loading and unloading go
through :class:`~fantasyportrait_core.residency.WeightHome`: weights move to the GPU from their
memory-mapped home and back by re-pointing, never as a RAM copy.
"""

from __future__ import annotations

import logging

import torch

from fantasyportrait_core.residency import WeightHome

log = logging.getLogger("FantasyPortrait")


class ComfyResident:
    """Duck-typed ``ModelPatcher`` for ``comfy.model_management`` (``LoadedModel``).

    Args:
        transformer, adapter: the modules that live on the GPU while sampling.
        home: their :class:`WeightHome`.
        load_device, offload_device: ComfyUI's torch device and unet offload device.
        dtype: compute dtype.
    """

    parent = None

    def __init__(self, transformer, adapter, home: WeightHome, load_device, offload_device, dtype):
        self.model = transformer  # ComfyUI keeps a weak reference to `.model` and logs its class name
        self.adapter, self.home = adapter, home
        self.load_device, self.offload_device, self.dtype = load_device, offload_device, dtype
        self.memory_required = 0  # bytes the next forward needs besides the weights (set per prompt)
        self.offload_active = False  # block offload hooks installed (then ComfyUI never loads it whole)

    # --- what LoadedModel / free_memory / load_models_gpu call
    def model_size(self) -> int:
        return self.home.total_bytes()

    def loaded_size(self) -> int:
        return self.home.bytes_on(self.load_device) if self.home.device is not None else 0

    def current_loaded_device(self):
        return self.home.device or self.offload_device

    def model_dtype(self):
        return self.dtype

    def model_patches_to(self, device):
        pass

    def model_patches_models(self):
        return []

    def lowvram_patch_counter(self) -> int:
        return 0

    def is_clone(self, other) -> bool:
        return other is self

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False) -> int:
        """Load everything (this model has no partial low-VRAM mode of ComfyUI's kind; block offload
        is our own plan). Returns the bytes newly placed on ``device_to``."""
        before = self.loaded_size()
        self.home.to(device_to)
        log.info("[FantasyPortrait] transformer on %s (%.1f GiB)", device_to, self.model_size() / 2**30)
        return self.loaded_size() - before

    def partially_unload(self, device_to, memory_to_free=0) -> int:
        return 0  # all or nothing: ComfyUI then calls detach()

    def detach(self, unpatch_all=True):
        released = self.home.go_home()
        if released:
            log.info("[FantasyPortrait] transformer unloaded from the GPU (%.1f GiB freed)", released / 2**30)
        return self.model


def comfy_model_management():
    try:
        import comfy.model_management as mm

        return mm
    except ImportError:
        return None


def vram_available(device, resident: ComfyResident | None = None) -> int | None:
    """Bytes the sampler can use on ``device``: free now + what ComfyUI can unload (its loaded
    models) + what our own resident transformer already holds. ``None`` for a CPU device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    mm = comfy_model_management()
    if mm is not None:
        free = mm.get_free_memory(device)
        for loaded in list(getattr(mm, "current_loaded_models", [])):
            try:
                if loaded.device == device and loaded.model is not resident:
                    free += loaded.model_loaded_memory()
            except Exception:  # a model ComfyUI is tearing down
                continue
    else:
        free_now, _ = torch.cuda.mem_get_info(device)
        free = free_now + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if resident is not None:
        free += resident.loaded_size()
    return int(free)


def load_resident(resident: ComfyResident, device, memory_required: int) -> None:
    """Put the transformer on ``device`` through ComfyUI's model management (which first unloads
    its own models to make room for the weights + ``memory_required``), or directly outside ComfyUI.
    Already resident: nothing moves."""
    resident.memory_required = int(memory_required)
    mm = comfy_model_management()
    if mm is not None and torch.device(device).type == "cuda":
        try:
            mm.load_models_gpu([resident], memory_required=int(memory_required), force_full_load=True)
            return
        except TypeError:  # an older ComfyUI without force_full_load
            mm.load_models_gpu([resident], memory_required=int(memory_required))
            return
    resident.home.to(device)


def free_for_offload(device, need_bytes: int) -> None:
    """Block offload keeps only a few blocks on the GPU: ask ComfyUI to unload its models until
    ``need_bytes`` are free (no-op outside ComfyUI or on the CPU)."""
    mm = comfy_model_management()
    if mm is None or torch.device(device).type != "cuda":
        return
    mm.free_memory(int(need_bytes), torch.device(device))
    mm.soft_empty_cache()

"""The FantasyPortrait transformer as a model ComfyUI's memory management knows about.

ComfyUI frees VRAM for a model by unloading the models in its list (``current_loaded_models``);
a model outside that list is invisible to it: it is neither freed for others nor kept for the next
prompt. :class:`ComfyResident` is, inside ComfyUI, a real ``comfy.model_patcher.ModelPatcher``
(a subclass, built when ComfyUI is importable) so that every call core makes on a loaded model
exists and behaves as core expects: the methods of the ComfyUI version at hand that this class does
not override (``is_dynamic``, ``pinned_memory_size``, ``loaded_ram_size``, ``partially_unload_ram``,
``model_mmap_residency``, ``model_patches_to``, ``is_clone``, callbacks, ... whatever that version
has) are ComfyUI's own. ``comfy.model_management.load_models_gpu`` first unloads what ComfyUI holds
to make room for the transformer and the activations, then keeps the transformer on the GPU
between queued prompts until ComfyUI (or another node's ``free_memory``) needs the memory, when it
calls :meth:`ComfyResident.detach`. What this class overrides is only *where the weights are*:
loading and unloading go through :class:`~fantasyportrait_core.runtime.residency.WeightHome` (weights move
to the GPU from their memory-mapped home and back by re-pointing, never as a RAM copy) and the
sizes ComfyUI budgets with are the transformer's + the adapter's bytes. The model is never
``is_dynamic()`` (ComfyUI's dynamic VRAM then treats it as a classic model: it is unloaded whole
when another model needs the room; it is not streamed by ComfyUI; block offload is our own plan).

Outside ComfyUI (CLI, tests without ComfyUI) the same class is a plain object with the same
attributes; nothing hands it to a model manager there.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch

from fantasyportrait_core.runtime.residency import WeightHome

log = logging.getLogger("FantasyPortrait")


def _patcher_base():
    """``comfy.model_patcher.ModelPatcher`` when ComfyUI is importable, else ``None``."""
    try:
        from comfy.model_patcher import ModelPatcher
    except ImportError:
        return None
    return ModelPatcher


@functools.lru_cache(maxsize=None)
def _with_patcher(cls: type, base: type) -> type:
    """``cls`` with ComfyUI's ``ModelPatcher`` as its next base (same name, our methods first)."""
    return type(cls.__name__, (cls, base), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                             "__doc__": cls.__doc__})


class ComfyResident:
    """The transformer + adapter as one ComfyUI model (a ``ModelPatcher`` subclass inside ComfyUI).

    Args:
        transformer, adapter: the modules that live on the GPU while sampling (``transformer`` is
            the patcher's ``.model``: ComfyUI keeps a weak reference to it and logs its class name).
        home: their :class:`WeightHome`.
        load_device, offload_device: ComfyUI's torch device and unet offload device.
        dtype: compute dtype (``model_dtype()``).

    Attributes:
        activation_bytes: bytes the next forward needs besides the weights (set per prompt by
            :func:`load_resident`; passed to ComfyUI as ``memory_required``).
        offload_active: block offload hooks are installed (then it is never loaded whole).
    """

    def __new__(cls, *args, **kwargs):
        base = _patcher_base()
        if base is not None and not issubclass(cls, base):
            cls = _with_patcher(cls, base)
        return object.__new__(cls)

    def __init__(self, transformer, adapter, home: WeightHome, load_device, offload_device, dtype):
        self.adapter, self.home, self.dtype = adapter, home, dtype
        self.activation_bytes = 0
        self.offload_active = False
        base = _patcher_base()
        if base is not None and isinstance(self, base):
            # ComfyUI's own constructor: every attribute its version reads later exists
            base.__init__(self, transformer, load_device, offload_device, size=home.total_bytes())
        else:
            self.model, self.load_device, self.offload_device, self.parent = transformer, load_device, offload_device, None

    # --- sizes and placement ComfyUI budgets with (our weights: transformer + adapter)
    def model_size(self) -> int:
        return self.home.total_bytes()

    def loaded_size(self) -> int:
        return self.home.bytes_on(self.load_device) if self.home.device is not None else 0

    def current_loaded_device(self):
        return self.home.device or self.offload_device

    def model_dtype(self):
        return self.dtype

    def lowvram_patch_counter(self) -> int:
        return 0  # never partially loaded in ComfyUI's lowvram sense

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False, **kwargs) -> int:
        """Load everything (no partial low-VRAM mode of ComfyUI's kind; block offload is our own
        plan). A negative ``extra_memory`` (newer ComfyUI asking a loaded model to shrink) moves
        nothing. Returns the bytes newly placed on ``device_to``."""
        if extra_memory is not None and extra_memory < 0:
            return 0
        before = self.loaded_size()
        self.home.to(device_to)
        if self.loaded_size() != before:
            log.info("[FantasyPortrait] transformer on %s (%.1f GiB)", device_to, self.model_size() / 2**30)
        return self.loaded_size() - before

    def partially_unload(self, device_to, memory_to_free=0, *args, **kwargs) -> int:
        return 0  # all or nothing: ComfyUI then calls detach()

    def detach(self, unpatch_all=True):
        """ComfyUI unloads the model (``unpatch_all=True``: weights go home, device memory is
        released). ``unpatch_all=False`` is ComfyUI re-registering the same weights (a clone being
        loaded): they stay where they are, as ComfyUI's own patcher keeps its weights then."""
        if unpatch_all:
            released = self.home.go_home()
            if released:
                log.info("[FantasyPortrait] transformer unloaded from the GPU (%.1f GiB freed)", released / 2**30)
        base = _patcher_base()
        if base is not None and isinstance(self, base):
            from comfy.patcher_extension import CallbacksMP

            for callback in self.get_all_callbacks(CallbacksMP.ON_DETACH):
                callback(self, unpatch_all)
        return self.model

    def clone(self, *args, **kwargs):
        """Another patcher of the same weights (shares ``home``; ``parent`` is this one)."""
        n = type(self)(self.model, self.adapter, self.home, self.load_device, self.offload_device, self.dtype)
        n.parent, n.offload_active = self, self.offload_active
        return n


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
    resident.activation_bytes = int(memory_required)
    mm = comfy_model_management()
    if mm is not None and torch.device(device).type == "cuda":
        kwargs = {"memory_required": int(memory_required)}
        if "force_full_load" in inspect.signature(mm.load_models_gpu).parameters:  # ComfyUI >= 0.3.2x
            kwargs["force_full_load"] = True
        mm.load_models_gpu([resident], **kwargs)
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

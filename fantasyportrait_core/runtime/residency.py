"""Where the weights live between and during generations, without copying them in RAM.

The loader assigns memory-mapped checkpoint tensors to the model (page cache, not private RAM).
``module.to("cuda")`` then ``module.to("cpu")`` would turn them into 30 GB of private RAM copies;
instead :class:`WeightHome` remembers each parameter's and buffer's tensor as loaded (its *home*)
and moves a model to the GPU by pointing each one at a device copy, and back by pointing it at its
home tensor again: no host copy is ever made, and the memory-mapped pages stay reclaimable.

:meth:`WeightHome.guard` puts every tensor back where it was when a step began if the step raises
(out of memory, a cancelled prompt) — also the blocks that diffusers' group offload had streamed
to the GPU when the exception hit.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from fantasyportrait_core.runtime.memory import tensor_bytes

log = logging.getLogger("FantasyPortrait")


def _tensors(modules):
    for module in modules:
        for sub in module.modules():
            for p in sub._parameters.values():
                if p is not None:
                    yield p
            for b in sub._buffers.values():
                if b is not None:
                    yield b


class WeightHome:
    """Home (as-loaded) tensors of ``modules``' parameters and buffers.

    Args:
        modules: e.g. the transformer and the adapter.
    """

    def __init__(self, *modules: torch.nn.Module):
        self.modules = modules
        self._home: dict[torch.Tensor, torch.Tensor] = {}
        self.device: torch.device | None = None  # where the weights are now (None: at home)
        self._scan()

    def _scan(self) -> list[torch.Tensor]:
        """Track tensors added since the last scan (LoRA layers, fp8 swaps): their current data is
        their home when they are not on the device the model was moved to; drop vanished ones."""
        live = list(dict.fromkeys(_tensors(self.modules)))
        alive = set(live)
        for t in [t for t in self._home if t not in alive]:
            del self._home[t]
        for t in live:
            if t not in self._home and (self.device is None or not _same_device(t.device, self.device)):
                self._home[t] = t.data
        return live

    def bytes_on(self, device) -> int:
        """Bytes of tracked tensors currently on ``device``."""
        device = torch.device(device)
        return tensor_bytes(t for t in self._scan() if _same_device(t.device, device))

    def total_bytes(self) -> int:
        return tensor_bytes(self._scan())

    @torch.no_grad()
    def to(self, device, non_blocking: bool = True) -> int:
        """Point every tensor at a copy on ``device`` made from its home tensor (home tensors
        already on ``device`` are used as they are). Returns the bytes copied."""
        device = torch.device(device)
        moved = 0
        for t in self._scan():
            if _same_device(t.device, device):
                continue
            home = self._home.get(t, t.data)
            t.data = home.to(device, non_blocking=non_blocking)
            moved += t.numel() * t.element_size()
        self.device = device
        return moved

    @torch.no_grad()
    def go_home(self) -> int:
        """Point every tensor at its home tensor again (drops the device copies; no host copy).
        Returns the bytes released from other devices."""
        released = 0
        for t in self._scan():
            home = self._home.get(t)
            if home is None and t.device.type not in ("cpu", "meta"):
                # made on the device while the model was there (e.g. a LoRA applied to a resident
                # model): it has no host tensor yet, so it gets one (small) and that is its home
                home = self._home[t] = t.data.to("cpu")
            if home is not None and t.data.data_ptr() != home.data_ptr():
                if not _same_device(t.device, home.device):
                    released += t.numel() * t.element_size()
                t.data = home
        self.device = None
        return released

    def snapshot(self) -> dict[torch.Tensor, torch.Tensor]:
        """Current data of every tracked tensor (for :meth:`guard`)."""
        return {t: t.data for t in self._scan()}

    @contextlib.contextmanager
    def guard(self):
        """On an exception inside the block, point every tensor back at the data it had on entry
        (e.g. the host copies group offload streams from), then re-raise."""
        before = self.snapshot()
        device = self.device
        try:
            yield self
        except BaseException:
            with torch.no_grad():
                for t, data in before.items():
                    if t.data.data_ptr() != data.data_ptr() or not _same_device(t.device, data.device):
                        t.data = data
            self.device = device
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise


@contextlib.contextmanager
def on_device(module: torch.nn.Module, device):
    """Put ``module`` on ``device`` for a stage and back where it was afterwards (frees VRAM between
    stages on small cards). Going back re-points each weight at the tensor it had before
    (:class:`~fantasyportrait_core.runtime.residency.WeightHome`): memory-mapped weights are not copied
    into RAM, as ``module.to("cpu")`` would."""
    home = WeightHome(module)
    home.to(device)
    try:
        yield module
    finally:
        home.go_home()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same one, as ``torch.device`` equality is not: ``"cuda"`` (index
    ``None``: the current device) and ``"cuda:0"`` compare unequal although they name one GPU
    when GPU 0 is current. Every device comparison of this module goes through here."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index == b.index or a.type in ("cpu", "meta"):
        return True

    def index(d):
        if d.index is not None:
            return d.index
        module = getattr(torch, d.type, None)  # torch.cuda, torch.xpu...
        try:
            return module.current_device() if module is not None and module.is_available() else 0
        except (AttributeError, RuntimeError):
            return 0

    return index(a) == index(b)


def group_offload_hook(module: torch.nn.Module):
    """diffusers' top-level group-offload hook of ``module`` (its ``config`` holds the onload device,
    stream and pinning options), or ``None`` when group offload is off (or this diffusers has none)."""
    try:
        from diffusers.hooks.group_offloading import _get_top_level_group_offload_hook
    except ImportError:  # pragma: no cover - diffusers without group offload
        return None
    return _get_top_level_group_offload_hook(module)


def compute_device(transformer: torch.nn.Module, device=None) -> torch.device:
    """The device the transformer's forward computes on.

    ``device`` when given (the CLI's ``--device``, the node's ComfyUI torch device: where the sampler
    runs); else, under diffusers group offload, the hook's onload device; else the device of the
    input projection's weight. A weight's device is not the answer under block offload: diffusers
    keeps every module outside the blocks (patch embedding, condition embedders, head) in an
    "unmatched" group that it moves back to the CPU after each forward
    (``diffusers/hooks/group_offloading.py``, ``_apply_group_offloading_block_level``), so between
    forwards those weights read ``cpu`` while the blocks compute on the GPU.
    """
    if device is not None:
        return torch.device(device)
    hook = group_offload_hook(transformer)
    if hook is not None:
        return torch.device(hook.config.onload_device)
    return transformer.patch_embedding.weight.device


def _remove_group_offload(module: torch.nn.Module) -> None:
    from diffusers.hooks import HookRegistry
    from diffusers.hooks import group_offloading as go

    registry = HookRegistry.check_if_exists_or_initialize(module)
    for name in (go._GROUP_OFFLOADING, go._LAYER_EXECUTION_TRACKER, go._LAZY_PREFETCH_GROUP_OFFLOADING):
        registry.remove_hook(name, recurse=True)


def _host_copies(module: torch.nn.Module) -> dict:
    """``{tensor: host copy}`` of every group of ``module``'s group offload (the pinned copies a
    streamed group onloads from; empty for groups without a stream)."""
    copies = {}
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = None if registry is None else registry.get_hook("group_offloading")
        if hook is not None:
            copies.update(getattr(hook.group, "cpu_param_dict", None) or {})
    return copies


@contextlib.contextmanager
def offload_suspended(transformer: torch.nn.Module):
    """Take diffusers' group offload off ``transformer`` for the block and put it back, with the same
    options, afterwards (also after an exception): what ``load_lora_weights(..., _pipeline=pipe)``
    does in diffusers (``_func_optionally_disable_offloading`` then
    ``_maybe_remove_and_reapply_group_offloading``).

    Needed for any change of the module's tensors (LoRA layers, fp8 low-rank deltas, full-weight
    diffs): a streamed group records its host copies once (``ModuleGroup.cpu_param_dict``) and
    looks every current tensor up in it on each onload, so a new tensor raises ``KeyError`` and a
    replaced one is put back to its old value at the next onload.

    Inside the block every weight is at rest on the host. Weights whose data is still the pinned
    host copy keep it when the offload is re-applied (``Tensor.pin_memory`` returns an already
    pinned tensor as it is), so no second pinned copy of the weights is made; only new or changed
    tensors (LoRA factors, patched norms) are pinned. No-op without group offload.
    """
    hook = group_offload_hook(transformer)
    if hook is None:
        yield
        return
    config = hook.config
    copies = _host_copies(transformer)
    with torch.no_grad():
        for t, host in copies.items():  # every streamed tensor at rest on its (pinned) host copy
            if not _same_device(t.device, host.device):
                t.data = host
    _remove_group_offload(transformer)
    try:
        yield
    finally:
        from diffusers.hooks.group_offloading import _apply_group_offloading

        _apply_group_offloading(transformer, config)


def free_vram_bytes(device) -> int | None:
    """Free memory on a CUDA ``device`` (driver free + what torch's allocator holds unused), or
    ``None`` for other devices."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def pinned_alloc_bytes(nbytes: int) -> int:
    """Bytes torch's pinned host allocator takes for one ``nbytes`` tensor: it rounds every
    allocation up to the next power of two (``CachingHostAllocator``: ``PowerOf2Ceil`` of the size,
    to reuse freed blocks), so a 14B Wan block's 52 MB attention weight takes 64 MiB and its 142 MB
    FFN weight 256 MiB; over the whole model about 1.5x the tensors' bytes."""
    return 0 if nbytes <= 0 else 1 << (int(nbytes) - 1).bit_length()


def streamed_tensors(transformer) -> list[list[torch.Tensor]]:
    """The tensors of each block (with its ``portrait_kv``): what block offload streams and pins."""
    return [list(dict.fromkeys((*b.parameters(), *b.buffers()))) for b in transformer.blocks]


def pinned_host_bytes(transformer) -> tuple[int, int]:
    """``(all blocks, largest block)`` in pinned host bytes as the allocator rounds them
    (:func:`pinned_alloc_bytes`): the page-locked RAM of pinning every block up front, and of one
    block pinned as it streams."""
    per_block = [sum(pinned_alloc_bytes(t.numel() * t.element_size()) for t in ts) for ts in streamed_tensors(transformer)]
    return sum(per_block), max(per_block, default=0)


def pin_weights_upfront(pinned_bytes: int, available_bytes: int | None) -> bool:
    """Whether block offload may keep a pinned (page-locked) host copy of all weights.

    Pinned copies are a second copy of the weights that cannot be swapped out; the cards that need
    offload often sit in machines with 32-64 GB of RAM, which also hold the text encoder and the
    rest of the workflow. So pin up front only when the copy, counted as the pinned allocator
    rounds it (:func:`pinned_host_bytes`: ~25 GiB for the 14B in fp8 with the adapter's K/V, ~47 GiB
    in bf16), takes under half of the RAM available now; else each block is pinned as it streams
    (diffusers ``low_cpu_mem_usage``), still overlapped with the compute.
    """
    return available_bytes is not None and 2 * pinned_bytes < available_bytes


def available_ram_bytes() -> int | None:
    """Host RAM available now (psutil when installed, else sysconf), or None if unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def enable_block_offload(transformer, device, available_ram: int | None, adapter=None) -> bool:
    """Stream the transformer's blocks to ``device`` one at a time: diffusers group offload, one
    block per group, the next block copied on a side CUDA stream while the current one computes.

    The copies overlap the compute: ``use_stream`` with ``record_stream`` (diffusers then never
    waits for the compute stream when it drops a block: the allocator reuses that memory once the
    compute stream has passed it; without ``record_stream`` it synchronises the compute stream after
    every block). The price is that up to three blocks' weights are on the GPU at once (the one
    computing, the next in flight, the last one until the compute stream passes it), counted by
    :meth:`~fantasyportrait_core.runtime.memory.ModelSize.weights`. Host side: every block pinned up front
    when it fits (:func:`pin_weights_upfront`), else each block pinned as it streams, announced in
    one log line.

    Args:
        available_ram: host RAM available now (:func:`available_ram_bytes`; ``None`` = unknown).
        adapter: the portrait adapter; its K/V projections of block i are attached to block i
            (``blocks.i.portrait_kv``, the same modules its processor calls) so that they stream
            with their block instead of staying on the GPU (1.6 GiB at 14B). The transformer's
            state dict then lists them too; nothing reads it after loading.
    Returns:
        Whether a pinned host copy of all weights was made (:func:`pin_weights_upfront`).
    """
    if adapter is not None:
        for i, block in enumerate(transformer.blocks):
            block.portrait_kv = torch.nn.ModuleList(adapter.kv_projections(i))
    device = torch.device(device)
    streams = device.type == "cuda"
    pinned, largest = pinned_host_bytes(transformer)
    upfront = pin_weights_upfront(pinned, available_ram)
    if streams and not upfront:
        ram = "unknown" if available_ram is None else f"{available_ram / 2**30:.1f} GiB"
        log.info("[FantasyPortrait] block offload pins each block as it streams (%.2f GiB page-locked at a time): "
                 "pinning all blocks up front would take %.1f GiB of page-locked RAM, more than half of the %s "
                 "available", largest / 2**30, pinned / 2**30, ram)
    transformer.enable_group_offload(device, offload_device=torch.device("cpu"), offload_type="block_level",
                                     num_blocks_per_group=1, use_stream=streams, record_stream=streams,
                                     low_cpu_mem_usage=not upfront)
    return upfront

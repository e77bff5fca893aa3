"""Leave models as they were, whatever happens during a generation.

A generation attaches a portrait condition to the attention processors, may move the transformer
and adapter to the GPU, and code running inside it (a LoRA, a preview, a compile step) may swap
attention processors or add forward hooks. A Cancel in ComfyUI raises from the progress callback; a
GPU running out of memory or Ctrl-C in the CLI raise from anywhere. :func:`restored` undoes all of
that on the way out, so the next prompt in the queue starts from the model the loader built.

Block offload (diffusers group offload, set up by the loader) keeps its own hooks and device
placement: those exist before the block is entered, so they are part of the recorded state and are
neither removed nor moved (``move=False`` leaves devices alone entirely).
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger("FantasyPortrait")


def _device_of(module: torch.nn.Module) -> torch.device | None:
    p = next(module.parameters(), None)
    return None if p is None else p.device


def _hook_keys(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, set]]:
    out = []
    for m in module.modules():
        for attr in ("_forward_pre_hooks", "_forward_hooks"):
            hooks = getattr(m, attr, None)
            if hooks is not None:
                out.append((m, attr, set(hooks)))
    return out


@contextlib.contextmanager
def restored(transformer: torch.nn.Module | None = None, state=None, modules: tuple = (), device=None,
             move: bool = True):
    """Run a generation and put everything back on exit (normal return, exception, Cancel, Ctrl-C).

    On entry it records, for ``transformer``, its attention processors (diffusers
    ``attn_processors``) and the forward (pre-)hooks of every submodule, and the device of each
    module in ``modules``; with ``move`` and a ``device`` it then moves those modules there.
    On exit: ``state.condition`` is cleared, processors replaced during the block are put back,
    hooks added during the block are removed, each module returns to its recorded device (with
    ``move``), and the CUDA cache is emptied.

    Args:
        transformer: the diffusers Wan transformer (or ``None``).
        state: the :class:`~fantasyportrait_core.model.attention.PortraitState` its processors share.
        modules: modules to move to ``device`` for the block and back afterwards (transformer,
            adapter...). Modules under block offload must be left out or ``move=False``.
        device: compute device of the block.
        move: move ``modules`` to ``device`` and back.
    Yields:
        None. Exceptions propagate unchanged after the restore.
    """
    processors = None
    if transformer is not None and hasattr(transformer, "attn_processors"):
        processors = dict(transformer.attn_processors)
    hooks = _hook_keys(transformer) if transformer is not None else []
    homes = [(m, _device_of(m)) for m in modules]
    try:
        if move and device is not None:
            for m in modules:
                m.to(device)
        yield
    finally:
        if state is not None:
            state.condition = None
        if processors is not None and transformer.attn_processors != processors:
            transformer.set_attn_processor(processors)
            log.info("[FantasyPortrait] attention processors replaced during the generation were restored")
        for m, attr, keys in hooks:
            table = getattr(m, attr)
            for k in [k for k in table if k not in keys]:
                del table[k]
                for aux in (attr + "_with_kwargs", "_forward_hooks_always_called"):
                    getattr(m, aux, {}).pop(k, None)
        if move:
            for m, home in homes:
                if home is not None and _device_of(m) != home:
                    m.to(home)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

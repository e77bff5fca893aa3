"""Attention kernels for the transformer's text/image attention: the backends offered to users
(diffusers' attention dispatch), their availability check and setting one per processor.
"""

from __future__ import annotations

import importlib.util

from diffusers.models.attention_dispatch import AttentionBackendName

# Attention backends offered to users -> diffusers ``AttentionBackendName`` values. "sdpa" lets
# PyTorch pick its fastest fused kernel (cuDNN on Hopper, flash elsewhere); the others force one.
ATTENTION_BACKENDS = {
    "sdpa": "native",
    "sdpa_cudnn": "_native_cudnn",
    "sdpa_flash": "_native_flash",
    "sageattention": "sage",
}


def backend_unavailable(name: str, backend: AttentionBackendName) -> None:
    """Raise ``ValueError`` (one line, naming the package to install) when diffusers' own requirement
    check refuses ``backend``; a diffusers without that check falls back to the package being
    importable at all."""
    try:
        from diffusers.models.attention_dispatch import _check_attention_backend_requirements
    except ImportError:  # pragma: no cover - older diffusers
        if name == "sageattention" and importlib.util.find_spec("sageattention") is None:
            raise ValueError("attention backend 'sageattention' needs the sageattention package "
                             "(pip install 'sageattention>=2.1.1'); use 'sdpa' otherwise") from None
        return
    try:
        _check_attention_backend_requirements(backend)
    except (RuntimeError, ImportError) as e:
        hint = (" (the registry's 'pip install sageattention' gives 1.0.6, which diffusers does not use: install "
                "SageAttention 2 from https://github.com/thu-ml/SageAttention)") if name == "sageattention" else ""
        raise ValueError(f"attention backend {name!r} cannot run here: {e}{hint} Use 'sdpa' otherwise.") from None


def set_attention_backend(transformer, name: str) -> None:
    """Use attention backend ``name`` (a key of :data:`ATTENTION_BACKENDS`) for the text/image
    attention of every block (self-attention and cross-attention; the portrait branch is a small
    masked SDPA and stays on PyTorch's default choice).

    Sets the backend on each processor only (no process-wide default, unlike diffusers'
    ``ModelMixin.set_attention_backend``), so other diffusers models in the process are unaffected.

    Availability is decided by the same check diffusers runs in ``ModelMixin.set_attention_backend``
    (``attention_dispatch._check_attention_backend_requirements``): e.g. diffusers uses sageattention
    only from 2.1.1 on and leaves its ``sageattn`` at ``None`` below, so an installed 1.0.6 (what
    ``pip install sageattention`` gives) is refused here instead of failing in the first forward
    with "'NoneType' object is not callable".

    Raises:
        ValueError: unknown name, a backend this diffusers lacks, or one its requirements refuse
            (package missing or too old), naming what to install.
    """
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; choose one of {list(ATTENTION_BACKENDS)}")
    value = ATTENTION_BACKENDS[name]
    if value not in {b.value for b in AttentionBackendName}:
        raise ValueError(f"attention backend {name!r} needs a newer diffusers (this one has no {value!r}); use 'sdpa'")
    backend = None if value == "native" else AttentionBackendName(value)
    if backend is not None:
        backend_unavailable(name, backend)
    for block in transformer.blocks:
        for attn in (block.attn1, block.attn2):
            attn.processor._attention_backend = backend

"""ComfyUI-FantasyPortrait: expression-driven portrait animation (FantasyPortrait, arXiv 2507.12956)
for one or several characters, on Wan2.1-I2V-14B."""

import os
import sys

# The core library is imported as a top-level package both here and in plain Python.
_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.append(_here)

if not __package__:
    # Imported as a lone module, not as ComfyUI's custom-node package: pytest does this when the
    # checkout's folder name is no valid package name (e.g. ComfyUI-FantasyPortrait). Nothing to register.
    __all__: list[str] = []
else:
    try:  # ComfyUI with the V3 node API: register through the extension entry point
        import comfy_api.latest  # noqa: F401
    except ImportError:  # older ComfyUI: classic mappings (ComfyUI reads these only when present)
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401

        __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
    else:
        from .nodes.v3 import comfy_entrypoint  # noqa: F401

        __all__ = ["comfy_entrypoint"]

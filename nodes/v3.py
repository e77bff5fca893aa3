"""ComfyUI V3 registration (``comfy_api`` ``io.ComfyNode`` / ``ComfyExtension`` / ``comfy_entrypoint``).

Each node is written once, as a plain class with ``INPUT_TYPES`` / ``FUNCTION`` (that form needs no
ComfyUI at import time, so the test suite runs every node without a ComfyUI install). Here each one
is turned into a V3 ``io.ComfyNode`` whose schema carries the same inputs, defaults, limits and
tooltips, and whose ``execute`` calls the plain class. ComfyUI versions without ``comfy_api`` use the
plain classes through ``NODE_CLASS_MAPPINGS`` instead (see the package ``__init__``).
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

import logging

from . import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .host import queue_validator
from .ids import core_node_replacements

log = logging.getLogger("FantasyPortrait")

_WIDGETS = {"INT": io.Int, "FLOAT": io.Float, "STRING": io.String, "BOOLEAN": io.Boolean}
_NATIVE = {"IMAGE": io.Image, "MASK": io.Mask, "CONDITIONING": io.Conditioning, "LATENT": io.Latent,
           "VAE": io.Vae, "CLIP_VISION_OUTPUT": io.ClipVisionOutput, "AUDIO": io.Audio, "VIDEO": io.Video,
           "MODEL": io.Model, "GUIDER": io.Guider, "SIGMAS": io.Sigmas, "FLOAT": io.Float, "INT": io.Int,
           "STRING": io.String}
_CUSTOM: dict[str, type] = {}


def _socket_type(name: str):
    if name in _NATIVE:
        return _NATIVE[name]
    if name not in _CUSTOM:
        _CUSTOM[name] = io.Custom(name)
    return _CUSTOM[name]


def _input(name: str, spec: tuple, optional: bool):
    kind = spec[0]
    opts = dict(spec[1]) if len(spec) > 1 else {}
    tooltip = opts.pop("tooltip", None)
    if isinstance(kind, list):
        return io.Combo.Input(name, options=kind, default=opts.get("default"), tooltip=tooltip, optional=optional)
    if kind in _WIDGETS:
        return _WIDGETS[kind].Input(name, optional=optional, tooltip=tooltip, **opts)
    return _socket_type(kind).Input(name, optional=optional, tooltip=tooltip)


def to_v3(node_id: str, classic: type) -> type:
    """A V3 ``io.ComfyNode`` with the schema of the plain node class ``classic``."""

    class Node(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> io.Schema:
            spec = classic.INPUT_TYPES()  # evaluated per request: model file lists stay current
            inputs = [_input(n, s, False) for n, s in spec.get("required", {}).items()]
            inputs += [_input(n, s, True) for n, s in spec.get("optional", {}).items()]
            names = getattr(classic, "RETURN_NAMES", classic.RETURN_TYPES)
            tips = getattr(classic, "OUTPUT_TOOLTIPS", (None,) * len(classic.RETURN_TYPES))
            outputs = [_socket_type(t).Output(display_name=n, tooltip=tip)
                       for t, n, tip in zip(classic.RETURN_TYPES, names, tips)]
            hidden = [io.Hidden(v) for v in spec.get("hidden", {}).values()]
            return io.Schema(node_id=node_id, display_name=NODE_DISPLAY_NAME_MAPPINGS.get(node_id, node_id),
                             category=classic.CATEGORY, description=getattr(classic, "DESCRIPTION", ""),
                             inputs=inputs, outputs=outputs, hidden=hidden,
                             is_output_node=getattr(classic, "OUTPUT_NODE", False))

        @classmethod
        def execute(cls, **kwargs) -> io.NodeOutput:
            # classic hidden inputs (e.g. "prompt": "PROMPT") arrive on cls.hidden in V3
            for name, kind in classic.INPUT_TYPES().get("hidden", {}).items():
                kwargs[name] = getattr(cls.hidden, io.Hidden(kind).name, None) if cls.hidden is not None else None
            return io.NodeOutput(*getattr(classic(), classic.FUNCTION)(**kwargs))

    validate = queue_validator(classic)  # dropdown values + the class's own VALIDATE_INPUTS, when queued
    if validate is not None:
        Node.validate_inputs = classmethod(validate)
    Node.__name__ = Node.__qualname__ = classic.__name__
    return Node


V3_NODES = [to_v3(node_id, cls) for node_id, cls in NODE_CLASS_MAPPINGS.items()]


async def register_node_replacements() -> int:
    """Register this pack's renamed node ids with core's node replacement where this ComfyUI has it
    (``ComfyAPI().node_replacement`` and ``io.NodeReplace``, newer than 0.3.x: feature detection).
    Returns how many were registered (0 here means: old graphs need scripts/migrate_workflows.py)."""
    import comfy_api.latest as latest

    replacements = core_node_replacements(io)
    api = getattr(latest, "ComfyAPI", None)
    registry = getattr(api(), "node_replacement", None) if api is not None and replacements else None
    if registry is None:
        return 0
    for r in replacements:
        await registry.register(r)
    return len(replacements)


class FantasyPortraitExtension(ComfyExtension):
    async def on_load(self) -> None:
        try:
            await register_node_replacements()
        except Exception as e:  # noqa: BLE001 - the nodes still load; old graphs then need the script
            log.warning("[FantasyPortrait] core node replacement not registered (%s: %s); migrate old graphs with "
                        "scripts/migrate_workflows.py", type(e).__name__, e)

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return V3_NODES


async def comfy_entrypoint() -> FantasyPortraitExtension:
    return FantasyPortraitExtension()

"""Node ids this pack registers, the ids it used before, and the migration of saved graphs.

Node ids (``class_type`` in an API prompt, ``type`` in a UI workflow) are global in ComfyUI: two packs
registering the same id override each other in load order, and a saved graph then loads the other
pack's node. Up to 2026-12 this pack registered ``FantasyPortraitModelLoader``, the id kijai's
ComfyUI-WanVideoWrapper registers for its own FantasyPortrait loader (``fantasyportrait/nodes.py``),
so it now registers :data:`NODE_ID_RENAMES` ``[old]`` instead. Graphs saved with the old id keep
loading:

* newer ComfyUI with core's node replacement (``comfy_api.latest`` ``ComfyAPI.node_replacement`` +
  ``io.NodeReplace``): the pack registers the rename (:func:`core_node_replacements`); core applies
  it to a graph whose old id no installed pack registers;
* otherwise (ComfyUI 0.3.x, or WanVideoWrapper installed, which registers the old id itself):
  ``python scripts/migrate_workflows.py my_graph.json`` rewrites the graph (:func:`migrate_graph`).

This module imports nothing but the standard library (the script loads it on its own).
"""

from __future__ import annotations

# old id -> new id
NODE_ID_RENAMES = {"FantasyPortraitModelLoader": "FantasyPortraitWanModelLoader"}

# what tells our old node from another pack's node with the same id: its output type (UI workflow)
# or an input only ours has (API prompt)
_OURS = {"FantasyPortraitModelLoader": ("FANTASYPORTRAIT_MODEL", "transformer")}

# the loader's inputs in widget order (UI workflows store widget values by position); the first
# _REQUIRED of them are required inputs, present in every saved prompt
_WIDGETS = {"FantasyPortraitModelLoader": ["transformer", "adapter", "weight_dtype", "storage", "offload", "fast_mode",
                                           "attention"]}
_REQUIRED = {"FantasyPortraitModelLoader": 5}


def migrate_graph(graph: dict) -> list[str]:
    """Rename this pack's old node ids in a saved graph, in place.

    Args:
        graph: a UI workflow (``{"nodes": [...], "links": ...}``, also nested ``definitions.subgraphs``)
            or an API prompt (``{"<id>": {"class_type": ..., "inputs": {...}}}``).
    Returns:
        one line per renamed node (``"<node id>: old -> new"``); empty when nothing was ours and old.
    Nodes of another pack that use the same old id (ComfyUI-WanVideoWrapper's loader outputs
    ``FANTASYPORTRAITMODEL``, ours ``FANTASYPORTRAIT_MODEL``) are left as they are.
    """
    done: list[str] = []
    if isinstance(graph.get("nodes"), list):
        _migrate_ui(graph, done)
        for sub in (graph.get("definitions") or {}).get("subgraphs") or []:
            _migrate_ui(sub, done)
    else:
        for key, node in graph.items():
            if not isinstance(node, dict):
                continue
            old = node.get("class_type")
            if old in NODE_ID_RENAMES and _OURS[old][1] in (node.get("inputs") or {}):
                node["class_type"] = NODE_ID_RENAMES[old]
                done.append(f"{key}: {old} -> {NODE_ID_RENAMES[old]}")
    return done


def _migrate_ui(graph: dict, done: list[str]) -> None:
    for node in graph.get("nodes") or []:
        old = node.get("type")
        if old not in NODE_ID_RENAMES:
            continue
        outputs = [o.get("type") for o in node.get("outputs") or []]
        if outputs and outputs[0] != _OURS[old][0]:
            continue  # another pack's node with that id
        node["type"] = NODE_ID_RENAMES[old]
        props = node.get("properties")
        if isinstance(props, dict) and props.get("Node name for S&R") == old:
            props["Node name for S&R"] = NODE_ID_RENAMES[old]
        done.append(f"{node.get('id')}: {old} -> {NODE_ID_RENAMES[old]}")


def core_node_replacements(io) -> list:
    """``io.NodeReplace`` objects for ComfyUI's node replacement (same outputs; widgets by position
    for the frontend; the required inputs by name for API prompts), or ``[]`` where this ComfyUI has
    none (feature detection: ``io.NodeReplace``).

    Core's ``apply_replacements`` (Comfy-Org/ComfyUI ``app/node_replace_manager.py``) empties the
    inputs and copies each mapped one with ``inputs[old_id]``, which raises for an input the old prompt
    lacks; the optional inputs (``fast_mode``, ``attention``: speed settings, added later) are
    therefore not mapped there and take their defaults, while the frontend keeps them through
    ``old_widget_ids``."""
    make = getattr(io, "NodeReplace", None)
    if make is None:
        return []
    return [make(new_node_id=new, old_node_id=old, old_widget_ids=list(_WIDGETS[old]),
                 input_mapping=[{"new_id": k, "old_id": k} for k in _WIDGETS[old][:_REQUIRED[old]]])
            for old, new in NODE_ID_RENAMES.items()]

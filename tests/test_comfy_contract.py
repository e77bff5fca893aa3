"""The pack's contract with ComfyUI and with the Wan packs artists have installed beside it.

Part 1 (always runs): our node ids and display names against the ids / names ComfyUI-WanVideoWrapper,
ComfyUI-KJNodes, ComfyUI-VideoHelperSuite and ComfyUI-GGUF register, read from their sources
(:func:`pack_registrations`; the list kept in ``tests/data/other_packs_node_ids.json`` with each
pack's commit, and re-read from the packs themselves when they are installed in
``COMFYUI_DIR/custom_nodes`` or named in ``FANTASYPORTRAIT_OTHER_PACKS``); graphs saved with an old
id of ours migrate (the old example workflow JSON as shipped before the rename).

Part 2 (runs when ``COMFYUI_DIR`` is set; ComfyUI's python: ``COMFYUI_PYTHON``, else
``COMFYUI_DIR/venv/bin/python``, else this python) runs ``scripts/comfy_contract.py`` (the probe
``scripts/check_in_comfyui.py`` runs too): in that ComfyUI, every ComfyUI symbol the pack
uses exists and the pack's calls bind to its signature (``inspect.signature(...).bind``); the
resident model is a real ``ModelPatcher`` that ComfyUI's model management loads, keeps, and unloads
through another node's ``free_memory``, and every method newer ComfyUI calls on loaded models
answers; the patched forward of ComfyUI's own ``WanModel`` (Wan2.1 I2V, tiny) runs and adds the
portrait term, and every other Wan model class there is refused with one line.

    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/python -m pytest tests/test_comfy_contract.py
    python tests/test_comfy_contract.py --other-packs DIR...   # rewrite the id list from pack checkouts
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHER_PACKS_FILE = os.path.join(ROOT, "tests", "data", "other_packs_node_ids.json")
OLD_WORKFLOW = os.path.join(ROOT, "tests", "data", "workflow_single_before_id_rename.json")
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
PACKS = ("ComfyUI-WanVideoWrapper", "ComfyUI-KJNodes", "ComfyUI-VideoHelperSuite", "ComfyUI-GGUF")

# ------------------------------------------------------------------------------------------------
# Part 1: node ids (no ComfyUI needed)


def _strings(node) -> list[str]:
    return [n.value for n in ([node] if not isinstance(node, (ast.List, ast.Tuple, ast.Set)) else node.elts)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def pack_registrations(pack_dir: str) -> tuple[set[str], set[str]]:
    """Node ids and display names a ComfyUI pack registers, read from its Python sources (no import).

    Recognised: ``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS`` dict literals (any variable
    whose name contains them), ``X["id"] = ...`` and ``X.update({...})`` on them, KJNodes' ``NODE_CONFIG``
    (``{"id": {"class": ..., "name": "display"}}``), V3 schemas (``node_id=`` / ``display_name=``
    keywords) and ComfyUI-GGUF's class ``TITLE`` attributes (its display names).
    """
    ids: set[str] = set()
    names: set[str] = set()
    for root, dirs, files in os.walk(pack_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("node_modules", "testframework"))
        for f in files:
            if not f.endswith(".py"):
                continue
            try:
                with open(os.path.join(root, f), encoding="utf-8", errors="replace") as fh:
                    tree = ast.parse(fh.read())
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                target, value = None, None
                if isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    value = node.value
                    for t in targets:
                        if isinstance(t, ast.Name):
                            target = t.id
                        elif isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name):
                            key = _strings(t.slice)
                            if "CLASS_MAPPINGS" in t.value.id or t.value.id == "NODE_CONFIG":
                                ids.update(key)
                            elif "DISPLAY_NAME_MAPPINGS" in t.value.id:
                                names.update(_strings(node.value))
                        elif isinstance(t, ast.Tuple):  # NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = f(...)
                            target = None
                    if target == "TITLE" and value is not None:
                        names.update(_strings(value))
                elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update"
                      and isinstance(node.func.value, ast.Name) and node.args):
                    target, value = node.func.value.id, node.args[0]
                if isinstance(node, ast.Call):
                    for kw in node.keywords:
                        if kw.arg == "node_id":
                            ids.update(_strings(kw.value))
                        elif kw.arg == "display_name" and isinstance(kw.value, ast.Constant):
                            names.update(_strings(kw.value))
                if target is None or not isinstance(value, ast.Dict):
                    continue
                keys = [k for k in value.keys if k is not None]
                if "CLASS_MAPPINGS" in target:
                    ids.update(s for k in keys for s in _strings(k))
                elif "DISPLAY_NAME_MAPPINGS" in target:
                    names.update(s for v in value.values for s in _strings(v))
                elif target == "NODE_CONFIG":
                    for k, v in zip(value.keys, value.values):
                        if k is not None:
                            ids.update(_strings(k))
                        if isinstance(v, ast.Dict):
                            for kk, vv in zip(v.keys, v.values):
                                if kk is not None and _strings(kk) == ["name"]:
                                    names.update(_strings(vv))
    return ids, names


def installed_packs() -> dict[str, str]:
    """Checkouts of the Wan packs found here: ``FANTASYPORTRAIT_OTHER_PACKS`` (os.pathsep-separated
    folders) or ``COMFYUI_DIR/custom_nodes/<pack>``."""
    found = {}
    for d in filter(None, os.environ.get("FANTASYPORTRAIT_OTHER_PACKS", "").split(os.pathsep)):
        found[os.path.basename(os.path.normpath(d))] = d
    for name in PACKS:
        d = os.path.join(COMFYUI_DIR or "", "custom_nodes", name)
        if COMFYUI_DIR and os.path.isdir(d):
            found.setdefault(name, d)
    return found


def _ours():
    import nodes

    return nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS


def test_reader_finds_every_registration_style(tmp_path):
    """The source reader on a pack written in each style the four packs use (and a decoy)."""
    (tmp_path / "a.py").write_text(
        'NODE_CLASS_MAPPINGS = {"DictId": A}\nNODE_DISPLAY_NAME_MAPPINGS = {"DictId": "Dict Name"}\n'
        'NODE_CLASS_MAPPINGS["SubId"] = B\nNODE_CLASS_MAPPINGS.update({"UpdId": C})\n'
        'NODE_CONFIG = {"CfgId": {"class": D, "name": "Cfg Name"}}\n'
        'class G:\n    TITLE = "Gguf Name"\n'
        'def define_schema():\n    return io.Schema(node_id="V3Id", display_name="V3 Name")\n'
        'OTHER = {"NotAnId": 1}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text('WRAPPER_NODE_CLASS_MAPPINGS = {"NestedId": E}\n')
    ids, names = pack_registrations(str(tmp_path))
    assert ids == {"DictId", "SubId", "UpdId", "CfgId", "V3Id", "NestedId"}
    assert names == {"Dict Name", "Cfg Name", "Gguf Name", "V3 Name"}


def test_no_node_id_or_display_name_of_ours_is_another_wan_packs():
    with open(OTHER_PACKS_FILE) as f:
        kept = json.load(f)
    assert set(kept) == set(PACKS)
    # the list is the packs' real registrations: the collision that made us rename is in it
    assert "FantasyPortraitModelLoader" in kept["ComfyUI-WanVideoWrapper"]["ids"]
    assert {"VHS_VideoCombine", "UnetLoaderGGUF"} <= set(kept["ComfyUI-VideoHelperSuite"]["ids"]) | set(
        kept["ComfyUI-GGUF"]["ids"])
    assert len(kept["ComfyUI-KJNodes"]["ids"]) > 100
    packs = {name: (set(v["ids"]), set(v["display_names"])) for name, v in kept.items()}
    for name, d in installed_packs().items():  # the installed versions too, read now
        packs[name + " (installed)"] = pack_registrations(d)
    mappings, display = _ours()
    assert len(set(display.values())) == len(display), "our display names are distinct among themselves"
    for name, (ids, names) in packs.items():
        assert not set(mappings) & ids, f"{name} registers our node ids {sorted(set(mappings) & ids)}"
        clash = {n.lower() for n in display.values()} & {n.lower() for n in names}
        assert not clash, f"{name} shows the display names {sorted(clash)} too"


def test_old_graphs_migrate_to_the_new_ids(tmp_path):
    from nodes.ids import NODE_ID_RENAMES, migrate_graph

    mappings, _ = _ours()
    for old, new in NODE_ID_RENAMES.items():
        assert old not in mappings and new in mappings
    with open(OLD_WORKFLOW) as f:
        old = json.load(f)
    with open(os.path.join(ROOT, "workflows", "fantasyportrait_single.json")) as f:
        shipped = json.load(f)
    done = migrate_graph(old)
    assert done == ["1: FantasyPortraitModelLoader -> FantasyPortraitWanModelLoader"]
    # the old example graph becomes today's: same nodes, links and widget values; inputs added since
    # (optional widgets, e.g. the Model Loader's transformer_2) are trailing values the frontend fills with
    # their defaults; positions and sizes follow from the widget count (layout only)
    assert old["links"] == shipped["links"]
    assert [n["id"] for n in old["nodes"]] == [n["id"] for n in shipped["nodes"]]
    layout = ("pos", "size", "widgets_values", "inputs")
    for a, b in zip(old["nodes"], shipped["nodes"]):
        assert {k: v for k, v in a.items() if k not in layout} == {k: v for k, v in b.items() if k not in layout}
        assert [i for i in a.get("inputs", []) if "widget" not in i] == [i for i in b.get("inputs", []) if "widget" not in i]
        wa, wb = a.get("widgets_values", []), b.get("widgets_values", [])
        assert wa == wb[:len(wa)], a["type"]
        if len(wb) > len(wa):
            from scripts.make_workflows import widgets

            assert wb[len(wa):] == widgets(b["type"])[len(wa):], f"{a['type']}: added widgets are not at their defaults"
    # WanVideoWrapper's loader has the old id too: left alone (its output type differs from ours)
    theirs = {"nodes": [{"id": 5, "type": "FantasyPortraitModelLoader", "outputs": [{"type": "FANTASYPORTRAITMODEL"}],
                         "properties": {"Node name for S&R": "FantasyPortraitModelLoader"}}], "links": []}
    assert migrate_graph(theirs) == [] and theirs["nodes"][0]["type"] == "FantasyPortraitModelLoader"
    # API prompts: ours has a transformer input, theirs does not
    api = {"3": {"class_type": "FantasyPortraitModelLoader", "inputs": {"transformer": "a", "adapter": "b"}},
           "4": {"class_type": "FantasyPortraitModelLoader", "inputs": {"model": "x"}}}
    assert migrate_graph(api) == ["3: FantasyPortraitModelLoader -> FantasyPortraitWanModelLoader"]
    assert api["4"]["class_type"] == "FantasyPortraitModelLoader"
    # the documented one command, in place with a backup
    path = tmp_path / "mine.json"
    path.write_text(open(OLD_WORKFLOW).read())
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "migrate_workflows.py"), str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "1 node(s) renamed" in out.stdout and (tmp_path / "mine.json.bak").read_text() == open(OLD_WORKFLOW).read()
    assert json.loads(path.read_text()) == old  # the script's result = migrate_graph's (checked above)
    again = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "migrate_workflows.py"), str(path)],
                           capture_output=True, text=True, timeout=60)
    assert "0 node(s) renamed" in again.stdout


def test_core_node_replacement_maps_every_input_of_the_old_node():
    """Where core has node replacement, the registered mapping carries every required input of the old
    node by name (core empties the inputs otherwise) and all widgets in the order the old graph stores them."""
    from nodes.ids import NODE_ID_RENAMES, core_node_replacements

    class FakeIO:  # the constructor of io.NodeReplace (newest Comfy-Org/ComfyUI comfy_api/latest/_io.py)
        class NodeReplace:
            def __init__(self, new_node_id, old_node_id, old_widget_ids=None, input_mapping=None, output_mapping=None):
                self.__dict__.update(locals())

    assert core_node_replacements(object()) == []  # ComfyUI without it (0.3.x)
    (r,) = core_node_replacements(FakeIO)
    mappings, _ = _ours()
    spec = mappings[r.new_node_id].INPUT_TYPES()
    inputs = [*spec["required"], *spec.get("optional", {})]
    assert (r.old_node_id, r.new_node_id) in NODE_ID_RENAMES.items()
    # every input the old loader had is a widget, in this order; inputs added after the rename (Wan2.2's
    # optional transformer_2) follow them and take their defaults
    assert r.old_widget_ids == inputs[:len(r.old_widget_ids)] and inputs[len(r.old_widget_ids):] == ["transformer_2"]
    # API prompts: the required inputs by name (core copies inputs[old_id]; an optional input an old
    # prompt lacks would raise there)
    assert r.input_mapping == [{"new_id": k, "old_id": k} for k in spec["required"]]
    with open(OLD_WORKFLOW) as f:
        node = next(n for n in json.load(f)["nodes"] if n["type"] == r.old_node_id)
    assert len(node["widgets_values"]) == len(r.old_widget_ids)


# ------------------------------------------------------------------------------------------------
# Part 2: the ComfyUI under test (COMFYUI_DIR)

needs_comfy = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR (and COMFYUI_PYTHON) to a ComfyUI checkout "
                                                         "to check the pack's contract with that ComfyUI")


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    py = os.environ.get("COMFYUI_PYTHON") or os.path.join(COMFYUI_DIR, "venv", "bin", "python")
    if not os.path.isfile(py):
        py = sys.executable
    out = tmp_path_factory.mktemp("contract") / "probe.json"
    run = subprocess.run([py, os.path.join(ROOT, "scripts", "comfy_contract.py"), COMFYUI_DIR, str(out)], capture_output=True,
                         text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0 and out.is_file(), run.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def _failures(results, group):
    rows = [r for r in results if r["group"] == group]
    assert rows, f"the probe ran no {group} checks"
    return [f"{r['name']}: {r['detail']}" for r in rows if not r["ok"]]


@needs_comfy
def test_every_comfyui_symbol_the_pack_uses_exists_and_binds(probe):
    assert not _failures(probe["results"], "symbol"), "\n".join(_failures(probe["results"], "symbol"))


@needs_comfy
def test_resident_model_is_a_model_patcher_core_can_load_and_free(probe):
    assert not _failures(probe["results"], "resident"), "\n".join(_failures(probe["results"], "resident"))


@needs_comfy
def test_patched_wan_forward_runs_and_other_wan_models_are_refused(probe):
    assert not _failures(probe["results"], "wan"), "\n".join(_failures(probe["results"], "wan"))
    refused = [r for r in probe["results"] if r["group"] == "wan" and r["name"].startswith("refuses ")]
    assert refused, "no other Wan model class found to refuse"
    assert all("\n" not in r["detail"] for r in refused), "one line each"


def _write_other_packs(dirs: list[str]) -> None:
    """Rewrite tests/data/other_packs_node_ids.json from pack checkouts (git work trees or exports;
    ``name=repo@commit`` after each folder records where it came from)."""
    kept = {}
    for item in dirs:
        d, _, origin = item.partition("=")
        ids, names = pack_registrations(d)
        repo, _, commit = origin.partition("@")
        kept[os.path.basename(os.path.normpath(d))] = {"repo": repo, "commit": commit, "ids": sorted(ids),
                                                       "display_names": sorted(names)}
    with open(OTHER_PACKS_FILE, "w") as f:
        json.dump(kept, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--other-packs"]:
        _write_other_packs(sys.argv[2:])
    else:
        sys.exit(__doc__)

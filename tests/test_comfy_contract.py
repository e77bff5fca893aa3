"""The pack's contract with ComfyUI and with the Wan packs artists have installed beside it.

Part 1 (always runs): our node ids and display names against the ids / names ComfyUI-WanVideoWrapper,
ComfyUI-KJNodes, ComfyUI-VideoHelperSuite and ComfyUI-GGUF register, read from their sources
(:func:`pack_registrations`; the list kept in ``tests/data/other_packs_node_ids.json`` with each
pack's commit, and re-read from the packs themselves when they are installed in
``COMFYUI_DIR/custom_nodes`` or named in ``FANTASYPORTRAIT_OTHER_PACKS``); graphs saved with an old
id of ours migrate (the old example workflow JSON as shipped before the rename).

Part 2 (runs when ``COMFYUI_DIR`` is set; ComfyUI's python: ``COMFYUI_PYTHON``, else
``COMFYUI_DIR/venv/bin/python``, else this python): in that ComfyUI, every ComfyUI symbol the pack
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

# Methods ComfyUI's model management calls on every model in current_loaded_models, collected from
# comfy/model_management.py of ComfyUI 0.3.64 (a125cd84) and of the newest indexed Comfy-Org/ComfyUI
# (02b2b388: LoadedModel, free_memory, load_models_gpu, pin eviction, reset_cast_buffers) and
# comfy/model_patcher.py (08d0e510). Arguments as core passes them.
CORE_CALLS_ON_LOADED_MODELS = [
    ("is_dynamic", ()), ("model_size", ()), ("loaded_size", ()), ("current_loaded_device", ()), ("model_dtype", ()),
    ("lowvram_patch_counter", ()), ("model_patches_models", ()), ("model_patches_to", ("DEVICE",)),
    ("model_patches_to", ("DTYPE",)), ("is_clone", ("SELF",)), ("partially_load", ("DEVICE", 0)),
    ("partially_load", ("DEVICE", -1)), ("partially_unload", ("DEVICE", 0)), ("pinned_memory_size", ()),
    ("loaded_ram_size", ()), ("partially_unload_ram", (0,)), ("model_mmap_residency", ()),
    ("get_nested_additional_models", ()), ("cleanup", ()),
]


# What ComfyResident itself decides (where the weights are and their sizes); everything else core
# calls comes from the ComfyUI version's own ModelPatcher.
OVERRIDDEN = {"model_size", "loaded_size", "current_loaded_device", "model_dtype", "lowvram_patch_counter",
              "partially_load", "partially_unload", "detach", "clone"}


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
    assert old == shipped, "the old example graph becomes exactly today's"
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
    assert json.loads(path.read_text()) == shipped
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
    assert r.old_widget_ids == inputs  # every input of the loader is a widget, in this order
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
    run = subprocess.run([py, os.path.abspath(__file__), "--probe", COMFYUI_DIR, str(out)], capture_output=True,
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


# ------------------------------------------------------------------------------------------------
# The probe (runs in ComfyUI's python)


def _run_probe(comfy_dir: str, out_path: str) -> None:  # noqa: C901 - one flat list of checks
    import importlib.util
    import inspect

    sys.path.insert(0, comfy_dir)
    sys.path.append(ROOT)  # fantasyportrait_core, after ComfyUI's own modules
    from comfy.cli_args import args

    args.cpu = True
    import torch

    torch.manual_seed(0)
    results = []

    def check(group, name, fn):
        try:
            detail = fn()
            results.append(dict(group=group, name=name, ok=True, detail=str(detail or "")))
        except Exception as e:  # noqa: BLE001 - recorded, the test decides
            results.append(dict(group=group, name=name, ok=False, detail=f"{type(e).__name__}: {e}".splitlines()[0]))

    import comfy.ldm.wan.model as wan
    import comfy.model_management as mm
    import comfy.model_patcher as mp
    import comfy.ops
    import comfy.patcher_extension as pe
    import comfy.samplers
    import comfy.utils
    import folder_paths

    spec = importlib.util.spec_from_file_location("fantasyportrait_pack", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["fantasyportrait_pack"] = pack
    spec.loader.exec_module(pack)
    from fantasyportrait_pack.nodes import native, residency

    from fantasyportrait_core.model.build import random_tiny_models
    from fantasyportrait_core.runtime.residency import WeightHome

    cpu = torch.device("cpu")
    tr, adapter, _, _ = random_tiny_models(0)

    # --- every ComfyUI symbol the pack uses, bound with the arguments the pack passes
    def binds(path, *a, **kw):
        def go():
            obj = None
            mod, _, rest = path.partition(":")
            obj = importlib.import_module(mod)
            for part in rest.split(".") if rest else []:
                obj = getattr(obj, part)
            if a or kw or callable(obj):
                if a == (None,):
                    return "exists"
                inspect.signature(obj).bind(*a, **kw)
            return "binds"
        check("symbol", path, go)

    module = torch.nn.Linear(2, 2)
    binds("comfy.model_management:load_models_gpu", ["M"], memory_required=1, force_full_load=True)
    binds("comfy.model_management:free_memory", 1, cpu)
    binds("comfy.model_management:get_free_memory", cpu)
    binds("comfy.model_management:soft_empty_cache")
    binds("comfy.model_management:get_torch_device")
    binds("comfy.model_management:unet_offload_device")
    binds("comfy.model_management:should_use_bf16", cpu)
    binds("comfy.model_management:should_use_fp16", cpu)
    binds("comfy.model_management:throw_exception_if_processing_interrupted")
    binds("comfy.model_management:loaded_models")
    binds("comfy.model_management:current_loaded_models", None)
    binds("comfy.model_patcher:ModelPatcher", module, load_device=cpu, offload_device=cpu)
    binds("comfy.model_patcher:ModelPatcher.__init__", "self", module, cpu, cpu, size=1)
    for name, a in [("clone", ("self",)), ("remove_wrappers_with_key", ("self", "t", "k")),
                    ("add_wrapper_with_key", ("self", "t", "k", print)), ("remove_callbacks_with_key", ("self", "t", "k")),
                    ("add_callback_with_key", ("self", "t", "k", print)), ("set_additional_models", ("self", "k", [])),
                    ("get_model_object", ("self", "diffusion_model")), ("get_nested_additional_models", ("self",)),
                    ("is_clone", ("self", "other")), ("get_all_callbacks", ("self", "t"))]:
        binds(f"comfy.model_patcher:ModelPatcher.{name}", *a)
    for attr in ("WrappersMP.DIFFUSION_MODEL", "WrappersMP.APPLY_MODEL", "CallbacksMP.ON_CLEANUP", "CallbacksMP.ON_DETACH"):
        binds(f"comfy.patcher_extension:{attr}", None)
    binds("comfy.ops:disable_weight_init.Linear", 2, 2)
    binds("comfy.ops:disable_weight_init.LayerNorm", 2)
    binds("comfy.samplers:CFGGuider", "model_patcher")
    binds("comfy.samplers:CFGGuider.inner_set_conds", "self", {"positive": [], "negative": []})
    binds("comfy.samplers:CFGGuider.predict_noise", "self", "x", "t", model_options={}, seed=None)
    binds("comfy.samplers:calc_cond_batch", "model", [], "x", "t", {})
    binds("comfy.utils:ProgressBar", 10)
    binds("comfy.utils:ProgressBar.update_absolute", "self", 1, 10, None)
    binds("comfy.latent_formats:Wan21")
    for name, a in [("get_filename_list", ("f",)), ("get_full_path", ("f", "n")), ("get_folder_paths", ("f",)),
                    ("add_model_folder_path", ("f", "/p"))]:
        binds(f"folder_paths:{name}", *a)
    for attr in ("folder_names_and_paths", "models_dir", "supported_pt_extensions"):
        binds(f"folder_paths:{attr}", None)
    # the wrappers' calls into core: DIFFUSION_MODEL executor = WanModel._forward, APPLY_MODEL = BaseModel._apply_model
    binds("comfy.ldm.wan.model:WanModel._forward", "self", "x", "t", "context", None, None, {}, context_latents=None)
    binds("comfy.model_base:BaseModel._apply_model", "self", "x", "t", None, None, None, {})
    binds("comfy.context_windows:IndexListContextWindow", [0, 1])
    try:
        from comfy_extras.nodes_context_windows import WanContextWindowsManualNode

        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from comfy_native_runner import context_window_args

        check("symbol", "comfy_extras.nodes_context_windows:WanContextWindowsManualNode.execute (runner's arguments)",
              lambda: inspect.signature(WanContextWindowsManualNode.execute).bind(
                  **context_window_args(WanContextWindowsManualNode.execute, "model", 5, 4)) and "binds")
    except ImportError as e:
        check("symbol", "comfy_extras.nodes_context_windows", lambda: (_ for _ in ()).throw(e))
    try:
        from comfy_api.latest import io

        binds("comfy_api.latest:ComfyExtension.get_node_list", "self")
        binds("comfy_api.latest:io.Schema", node_id="X", display_name="X", category="c", description="d", inputs=[],
              outputs=[], hidden=[])
        binds("comfy_api.latest:io.Combo.Input", "n", options=["a"], default="a", tooltip="t", optional=False)
        for w in ("Int", "Float", "String", "Boolean"):
            binds(f"comfy_api.latest:io.{w}.Input", "n", optional=False, tooltip="t", default=None)
        binds("comfy_api.latest:io.Custom", "FP_PORTRAIT")
        binds("comfy_api.latest:io.Hidden", None)
        binds("comfy_api.latest:io.NodeOutput", 1, 2)
        import asyncio

        def replacements():
            from fantasyportrait_pack.nodes.ids import core_node_replacements

            if hasattr(io, "NodeReplace"):  # registered by the server in on_load; here: built and serialisable
                built = [r.as_dict() for r in core_node_replacements(io)]
                return f"{len(built) or 1 / 0} io.NodeReplace built: {built[0]['old_node_id']} -> {built[0]['new_node_id']}"
            n = asyncio.run(sys.modules["fantasyportrait_pack.nodes.v3"].register_node_replacements())
            return f"{n} registered" + ("" if n else " (no core node replacement here: scripts/migrate_workflows.py)")
        check("symbol", "core node replacement of the old loader id", replacements)
        check("symbol", "pack V3 schemas build", lambda: [n.define_schema() for n in
                                                           sys.modules["fantasyportrait_pack.nodes.v3"].V3_NODES] and "ok")
    except ImportError:
        check("symbol", "comfy_api.latest absent: classic NODE_CLASS_MAPPINGS used",
              lambda: pack.NODE_CLASS_MAPPINGS and "classic")

    # --- the resident model under ComfyUI's model management
    home = WeightHome(tr, adapter)
    res = residency.ComfyResident(tr, adapter, home, cpu, cpu, torch.float32)
    check("resident", "is a comfy.model_patcher.ModelPatcher", lambda: isinstance(res, mp.ModelPatcher) or 1 / 0)
    check("resident", "load_models_gpu registers it", lambda: (
        mm.load_models_gpu([res], memory_required=1000, force_full_load=True) if "force_full_load" in
        inspect.signature(mm.load_models_gpu).parameters else mm.load_models_gpu([res], memory_required=1000),
        res in mm.loaded_models() or 1 / 0, home.device is not None or 1 / 0))
    check("resident", "loaded again: found, not duplicated", lambda: (
        mm.load_models_gpu([res]), sum(1 for m in mm.loaded_models() if m is res) == 1 or 1 / 0))
    arg = {"DEVICE": cpu, "DTYPE": torch.float32, "SELF": res}
    for name, a in CORE_CALLS_ON_LOADED_MODELS:
        def call(name=name, a=a):
            method = getattr(type(res), name, None)
            if method is None:
                if getattr(mp.ModelPatcher, name, None) is None:
                    return f"not in this ComfyUI's ModelPatcher (inherited where core has it)"
                raise AttributeError(name)
            return repr(getattr(res, name)(*[arg.get(x, x) if isinstance(x, str) else x for x in a]))[:80]
        check("resident", f"{name}{tuple(a)}", call)
    own = {n for n in vars(residency.ComfyResident) if not n.startswith("__")}
    check("resident", "core's own methods are not shadowed (is_dynamic, pins, RAM, mmap, memory_required, ...)",
          lambda: (sorted(own & {n for n, _ in CORE_CALLS_ON_LOADED_MODELS} - OVERRIDDEN) and 1 / 0,
                   callable(res.memory_required) or 1 / 0, sorted(own)))
    check("resident", "weights still loaded after those calls", lambda: home.device is not None or 1 / 0)
    check("resident", "another node's free_memory unloads it cleanly", lambda: (
        mm.free_memory(1e30, cpu), res not in mm.loaded_models() or 1 / 0, home.device is None or 1 / 0,
        mm.free_memory(1e30, cpu)))  # and a second call finds nothing of ours to fail on
    check("resident", "unload_all_models after a reload", lambda: (
        mm.load_models_gpu([res]), mm.unload_all_models(), res not in mm.loaded_models() or 1 / 0,
        home.device is None or 1 / 0))

    # --- ComfyUI's own Wan models: the one accepted runs patched, the others are refused
    def tiny_wan(cls=wan.WanModel, **kw):
        cfg = dict(model_type="i2v", patch_size=(1, 2, 2), text_len=8, in_dim=36, dim=adapter.dim, ffn_dim=32,
                   freq_dim=16, text_dim=16, out_dim=16, num_heads=2, num_layers=adapter.num_layers,
                   operations=comfy.ops.disable_weight_init)
        cfg.update(kw)
        m = cls(**cfg)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        return m.eval()

    from fantasyportrait_pack.nodes.portrait import PortraitInputs
    import numpy as np
    from fantasyportrait_core.drive.encode import DrivingExpression
    from fantasyportrait_core.faces.face import Face, FaceTrack

    def portrait(scale):
        g = torch.Generator().manual_seed(3)
        box = np.array([4.0, 4, 28, 28])
        d = DrivingExpression(torch.randn(9, 554, generator=g),
                              FaceTrack(np.tile(box, (9, 1)), np.zeros((9, 5, 2)), np.ones(9, bool)))
        return PortraitInputs([Face(box, np.zeros((5, 2)), 0.9)], [d], 32, 32, scale, [None])

    def forward(model, runtime):
        g = torch.Generator().manual_seed(2)
        x = torch.randn(1, 36, 3, 4, 4, generator=g)
        opts = {}
        if runtime is not None:
            opts = {"wrappers": {pe.WrappersMP.DIFFUSION_MODEL: {"fp": [runtime]}}}
        with torch.no_grad():
            return model(x, torch.tensor([500.0]), torch.randn(1, 8, 16, generator=g),
                         clip_fea=torch.randn(1, 257, 1280, generator=g), transformer_options=opts)

    def patched_runs():
        m = tiny_wan()
        native.check_wan_i2v(m, adapter)
        plain = forward(m, None)
        on = forward(m, native.NativePortrait(portrait(1.0), adapter, adapter.ip_adapter))
        off = forward(m, native.NativePortrait(portrait(0.0), adapter, adapter.ip_adapter))
        after = forward(m, None)
        hooks = sum(len(b.cross_attn.norm_q._forward_hooks) + len(b.cross_attn.o._forward_pre_hooks) for b in m.blocks)
        if not torch.equal(off, plain) or not torch.equal(after, plain) or hooks:
            raise AssertionError("unpatched forward changed by the patch")
        diff = (on - plain).abs().max().item()
        if not diff > 1e-4:
            raise AssertionError(f"portrait term did not reach the output ({diff})")
        return f"portrait moves the output by {diff:.3g}"

    check("wan", "WanModel i2v: patched forward runs, unpatched unchanged", patched_runs)

    def same_attention_calls():
        """Core's attention is called by the patched blocks exactly as by unpatched ones: same number
        of calls, same keyword arguments (sage / low-precision flags, preferred per-layer attention,
        transformer_options keys), same shapes; the portrait term adds no call of its own there."""
        m = tiny_wan()
        original = wan.optimized_attention
        calls = []

        def recorder(*a, **kw):
            calls.append(([tuple(getattr(t, "shape", ())) for t in a[:3]],
                          {k: (sorted(v) if isinstance(v, dict) else repr(v)) for k, v in kw.items()}))
            return original(*a, **kw)

        wan.optimized_attention = recorder
        try:
            forward(m, None)
            plain, calls[:] = list(calls), []
            forward(m, native.NativePortrait(portrait(1.0), adapter, adapter.ip_adapter))
        finally:
            wan.optimized_attention = original
        if not plain or [(s, {k: v for k, v in kw.items() if k != "transformer_options"}) for s, kw in calls] != [
                (s, {k: v for k, v in kw.items() if k != "transformer_options"}) for s, kw in plain]:
            raise AssertionError(f"attention calls differ: {plain[:2]} vs {calls[:2]}")
        return f"{len(plain)} calls, kwargs {sorted(plain[0][1])}"

    check("wan", "WanModel i2v: core attention called as unpatched (flags, per-layer attention)", same_attention_calls)

    def refuses(cls, kw):
        def go():
            try:
                m = tiny_wan(cls, **kw)
            except Exception:  # a class needing other arguments: checked as constructed by ComfyUI's type only
                m = cls.__new__(cls)
                torch.nn.Module.__init__(m)
            try:
                native.check_wan_i2v(m, adapter)
            except ValueError as e:
                return str(e)
            raise AssertionError(f"{cls.__name__} {kw} accepted")
        return go

    check("wan", "refuses WanModel t2v", refuses(wan.WanModel, {"model_type": "t2v", "in_dim": 16}))
    for name, cls in sorted(vars(wan).items()):
        if isinstance(cls, type) and issubclass(cls, wan.WanModel) and cls is not wan.WanModel:
            check("wan", f"refuses {name}", refuses(cls, {}))
    for modname in ("comfy.ldm.wan.model_animate", "comfy.ldm.wan.model_multitalk", "comfy.ldm.wan.model_animate2"):
        try:
            m2 = importlib.import_module(modname)
        except ImportError:
            continue
        for name, cls in sorted(vars(m2).items()):
            if isinstance(cls, type) and issubclass(cls, wan.WanModel) and cls.__module__ == modname:
                check("wan", f"refuses {modname}.{name}", refuses(cls, {}))

    with open(out_path, "w") as f:
        json.dump({"comfy_dir": comfy_dir, "results": results}, f, indent=1)
    bad = [r for r in results if not r["ok"]]
    print(f"[contract] {len(results) - len(bad)}/{len(results)} checks pass", file=sys.stderr)


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
    if sys.argv[1:2] == ["--probe"]:
        _run_probe(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["--other-packs"]:
        _write_other_packs(sys.argv[2:])
    else:
        sys.exit(__doc__)

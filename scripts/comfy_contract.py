"""The pack's contract with a ComfyUI checkout, checked inside that ComfyUI's python.

    COMFY_PYTHON scripts/comfy_contract.py COMFYUI_DIR OUT.json

Every ComfyUI symbol the pack uses exists and the pack's calls bind to its signature
(``inspect.signature(...).bind``); the resident model is a real ``ModelPatcher`` that ComfyUI's model
management loads, keeps, and unloads through another node's ``free_memory``, and every method newer
ComfyUI calls on loaded models answers; the patched forward of ComfyUI's own ``WanModel`` (Wan2.1
I2V, tiny) runs and adds the portrait term, and every other Wan model class there is refused with
one line. Writes one JSON row per check; exit status 0 when the probe ran (the rows say what
passed). Used by ``scripts/check_in_comfyui.py`` and ``tests/test_comfy_contract.py``.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def context_window_args(execute, model, length: int, overlap: int) -> dict:
    """Keyword arguments for ComfyUI's ``WanContextWindowsManualNode.execute`` of the version at hand,
    bound by name (newer versions added ``freenoise``, ``causal_window_fix``, ``retain_first_frame``,
    ... and changed the order): the same schedule and fusion as our sampler's windows, FreeNoise off,
    the version's own defaults for everything else. ``length`` / ``overlap`` are pixel frames."""
    import inspect

    params = inspect.signature(execute).parameters
    args = dict(model=model, context_length=length, context_overlap=overlap, context_schedule="standard_static",
                context_stride=1, closed_loop=False, fuse_method="pyramid", freenoise=False)
    return {k: v for k, v in args.items() if k in params}




def run_probe(comfy_dir: str, out_path: str) -> None:  # noqa: C901 - one flat list of checks
    """Run every check in the ComfyUI at ``comfy_dir`` (this must be ComfyUI's python) and write
    ``{"comfy_dir", "results": [{"group", "name", "ok", "detail"}...]}`` to ``out_path`` (JSON)."""
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


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    run_probe(sys.argv[1], sys.argv[2])

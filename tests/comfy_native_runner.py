"""Samples with ComfyUI's own Wan MODEL + this pack's native nodes, inside ComfyUI's python (no server).

    COMFY_PYTHON tests/comfy_native_runner.py JOB.pt OUT.pt

Called by ``tests/test_native_comfyui.py`` in a subprocess (ComfyUI has its own venv; its ``nodes``
module and ours share a name, so this pack is imported here under another package name). The job
(``torch.save`` of a dict, written by the test) names the ComfyUI checkout, the tiny Wan checkpoint
(original key layout, loaded with ``comfy.sd.load_diffusion_model`` like Load Diffusion Model),
the adapter file, an optional LoRA folder, the CONDITIONING parts, the portraits, the sigmas and
the runs; each run goes through the real nodes (LoraLoaderModelOnly, FantasyPortrait Adapter
Loader / Patch Model / Guider, BasicGuider, KSamplerSelect ``euler``, RandomNoise,
SamplerCustomAdvanced) and its output latent is saved under its name in OUT.
"""

import importlib.util
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from comfy_contract import context_window_args  # noqa: E402


def main(job_path: str, out_path: str):
    sys.path.append(ROOT)  # fantasyportrait_core (faces, drivers in the job); after ComfyUI's own modules
    job = torch.load(job_path, weights_only=False)
    comfy_dir = job["comfy_dir"]
    sys.path.insert(0, comfy_dir)
    torch.set_num_threads(int(job.get("threads", 2)))
    from comfy.cli_args import args

    args.cpu = True
    import comfy.clip_vision
    import comfy.sd
    import folder_paths
    import nodes as comfy_nodes
    from comfy_extras import nodes_custom_sampler as custom

    spec = importlib.util.spec_from_file_location("fantasyportrait_pack", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["fantasyportrait_pack"] = pack
    spec.loader.exec_module(pack)
    from fantasyportrait_pack.nodes import native
    from fantasyportrait_pack.nodes.portrait import PortraitInputs

    if job.get("lora_dir"):
        folder_paths.add_model_folder_path("loras", job["lora_dir"])

    c = job["conditioning"]
    clip = comfy.clip_vision.Output()
    clip["penultimate_hidden_states"] = c["clip"]
    extra = {"concat_latent_image": c["concat_latent_image"], "concat_mask": c["concat_mask"]}
    if c.get("clip") is not None:  # Wan2.2-I2V-A14B: no CLIP vision input
        extra["clip_vision_output"] = clip
    positive = [[c["text_positive"], dict(extra)]]
    negative = [[c["text_negative"], dict(extra)]]
    latent = {"samples": torch.zeros(job["latent_shape"])}
    portraits = {k: PortraitInputs(v["faces"], v["drivers"], v["ref_width"], v["ref_height"], v.get("scale", 1.0),
                                   [None] * len(v["drivers"])) for k, v in job["portraits"].items()}

    adapters = {}

    def adapter_in(dtype):
        if dtype not in adapters:
            # picked by file name from models/fantasyportrait, as in the UI (paths are refused there)
            folder_paths.add_model_folder_path("fantasyportrait", os.path.dirname(job["adapter"]))
            name = os.path.basename(job["adapter"])
            kv = job.get("flashportrait_transformer")  # FlashPortrait: its transformer.pt, by name as in the UI
            if kv:
                folder_paths.add_model_folder_path("diffusion_models", os.path.dirname(kv))
            adapters[dtype] = native.FantasyPortraitAdapterLoader().load(
                name, dtype, **({"flashportrait_transformer": os.path.basename(kv)} if kv else {}))[0]
        return adapters[dtype]

    (noise,) = custom.RandomNoise().get_noise(job["seed"])
    (sampler,) = custom.KSamplerSelect().get_sampler("euler")
    models = {}
    results = {}
    print(f"[runner] ComfyUI + pack imported, adapter loaded: {time.time() - T0:.1f} s", file=sys.stderr)
    gguf_loader = None
    if job.get("gguf_pack"):  # city96's ComfyUI-GGUF, imported like ComfyUI imports a custom node pack
        spec = importlib.util.spec_from_file_location("comfyui_gguf", os.path.join(job["gguf_pack"], "__init__.py"),
                                                      submodule_search_locations=[job["gguf_pack"]])
        gguf_pack = importlib.util.module_from_spec(spec)
        sys.modules["comfyui_gguf"] = gguf_pack
        spec.loader.exec_module(gguf_pack)
        gguf_loader = gguf_pack.NODE_CLASS_MAPPINGS["UnetLoaderGGUF"]()

    def load(name, run):
        path = job.get("checkpoints", {}).get(name, job["checkpoint"])
        if path.endswith(".gguf"):  # by file name from models/diffusion_models, as in the UI
            folder_paths.add_model_folder_path("diffusion_models", os.path.dirname(path))
            # dequant_dtype: Unet Loader (GGUF/Advanced)'s option ("float32": exact Q8_0 values)
            return gguf_loader.load_unet(os.path.basename(path), dequant_dtype=run.get("dequant_dtype"))[0]
        return comfy.sd.load_diffusion_model(path)

    def stages(run):
        """Wan2.2's two-expert graph: each stage its own MODEL (patched or not), its slice of the sigmas,
        the previous stage's latent, noise added by the first stage only (KSamplerAdvanced's split)."""
        x = latent
        for i, st in enumerate(run["stages"]):
            if st["model"] not in models:
                models[st["model"]] = load(st["model"], run)
            model = models[st["model"]]
            if st.get("portrait"):
                (model,) = native.FantasyPortraitPatchModel().patch(model, adapter_in("auto"), portraits[st["portrait"]])
            if run["guider"] == "fantasyportrait" and st.get("portrait"):
                (guider,) = native.FantasyPortraitGuider().get_guider(model, positive, negative, run["cfg"],
                                                                      run["portrait_cfg"])
            else:
                (guider,) = custom.CFGGuider().get_guider(model, positive, negative, run["cfg"])
            sig = job["sigmas"][st["start"]:st["end"] + 1]
            (n,) = (noise,) if i == 0 else custom.DisableNoise().get_noise()
            x, _ = custom.SamplerCustomAdvanced().sample(n, guider, sampler, sig, x)
        return x["samples"].float().cpu()

    for run in job["runs"]:
        t_run = time.time()
        if run.get("stages"):
            try:
                results[run["name"]] = stages(run)
            except Exception as e:  # reported to the test, which decides
                results[run["name"]] = f"{type(e).__name__}: {e}"
            print(f"[runner] {run['name']}: {time.time() - t_run:.1f} s", file=sys.stderr)
            continue
        if run.get("model", "base") not in models or run.get("fresh"):
            models[run.get("model", "base")] = load(run.get("model", "base"), run)
        model = models[run.get("model", "base")]
        if run.get("lora"):
            name, strength = run["lora"]
            (model,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)
        if run.get("portrait"):
            adapter = adapter_in(run.get("adapter_dtype", "auto"))
            try:
                (model,) = native.FantasyPortraitPatchModel().patch(model, adapter, portraits[run["portrait"]])
            except ValueError as e:  # a refused MODEL/adapter pair: reported to the test, which decides
                results[run["name"]] = f"{type(e).__name__}: {e}"
                continue
        if run.get("context"):
            # (pixel frames, latent overlap): 4·k pixel frames of overlap is k latent frames under both
            # ComfyUI 0.3.64's rounding ((o - 1) // 4 + 1) and newer ComfyUI's (o // 4)
            length, overlap = run["context"][0], 4 * run["context"][1]
            from comfy_extras.nodes_context_windows import WanContextWindowsManualNode
            model = WanContextWindowsManualNode.execute(**context_window_args(WanContextWindowsManualNode.execute, model,
                                                                             length, overlap)).args[0]
        if run["guider"] == "fantasyportrait":
            (guider,) = native.FantasyPortraitGuider().get_guider(model, positive, negative, run["cfg"],
                                                                  run["portrait_cfg"])
        elif run["guider"] == "cfg":
            (guider,) = custom.CFGGuider().get_guider(model, positive, negative, run["cfg"])
        else:
            (guider,) = custom.BasicGuider().get_guider(model, positive)
        try:
            out, _ = custom.SamplerCustomAdvanced().sample(noise, guider, sampler, job["sigmas"], latent)
            results[run["name"]] = out["samples"].float().cpu()
            if run.get("facts"):  # how ComfyUI's model management sees the patched MODEL and the adapter
                import comfy.model_management as mm

                extra = model.get_nested_additional_models()
                loaded = mm.loaded_models()
                results[run["name"] + ":facts"] = {
                    "additional": [(type(m.model).__name__, m.model_size()) for m in extra],
                    "adapter_bytes": sum(t.numel() * t.element_size() for t in adapter.adapter.parameters()),
                    "loaded_with_model": [any(m.is_clone(x) for x in loaded) for m in extra],
                    "kv_dtype": str(adapter.kv_for(None)[1].blocks[0].cross_attn.ip_adapter_single_stream_k_proj
                                    .weight.dtype),
                    "token_dtype": str(adapter.adapter.proj_model.norm.weight.dtype),
                }
        except Exception as e:  # reported to the test, which decides
            results[run["name"]] = f"{type(e).__name__}: {e}"
        print(f"[runner] {run['name']}: {time.time() - t_run:.1f} s", file=sys.stderr)
    torch.save(results, out_path)


if __name__ == "__main__":
    T0 = time.time()
    main(sys.argv[1], sys.argv[2])

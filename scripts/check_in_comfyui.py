"""Check this pack inside a real ComfyUI: nodes listed, example workflows executed to a video.

    COMFYUI_PYTHON=/path/to/ComfyUI/venv/bin/python \\
        python scripts/check_in_comfyui.py /path/to/ComfyUI [--port 8199] [--keep]

What it does, against the ComfyUI checkout at the given path (nothing is downloaded or built):
1. writes tiny random checkpoints (a 2-block Wan2.1-I2V transformer in the original key layout, as
   one file for the single workflow and as 3 numbered shards in a subfolder for the multi workflow,
   which picks shard 2 as a user would from the dropdown; the repacked adapter with pd_fpg; a random
   full-size Wan2.1 VAE built by ComfyUI itself; for the native workflow the smallest Wan2.1-I2V
   checkpoint ComfyUI's own model detection takes as WAN21_I2V, its adapter and a tiny LoRA) into a
   temporary models folder registered with ``--extra-model-paths-config``;
2. links this pack into ``custom_nodes/`` plus a small check-only pack providing two nodes that
   stand in for umT5-XXL text encoding and CLIP-ViT-H image encoding (11 GB and 2.5 GB models
   that a CPU test machine cannot run), emitting CONDITIONING / CLIP_VISION_OUTPUT of the shapes the
   native nodes produce;
3. starts ``main.py --cpu`` on loopback, checks ``/object_info`` lists every node of this pack;
4. converts each example workflow (UI format) to an API prompt exactly by the node definitions,
   swaps the text/CLIP-vision nodes for the stand-ins, shrinks size/length/steps, queues it through
   ``/prompt`` and waits for the SaveVideo output; decodes it and checks frame count and size (the
   native workflow twice: as shipped, with its LoraLoaderModelOnly bypassed, and with it enabled);
5. with ``--screenshots DIR``: clears ComfyUI's cache, then ``scripts/screenshot_workflows.mjs``
   opens every example workflow in the browser UI, queues the checked ones from the UI (answered
   with the same check prompts), waits for the run and saves ``DIR/workflow_<name>.png`` with the
   previews shown; it fails on overlapping nodes (needs node, npm ``playwright-core`` through
   ``--node-path`` or NODE_PATH, and Chromium through ``--chromium`` or CHROMIUM);
6. removes the links and temporary files and prints a summary (non-zero exit on failure).

Before the server starts it runs ``scripts/comfy_contract.py`` in ComfyUI's python (every
ComfyUI symbol the pack uses binds, the resident model is a real ModelPatcher that core loads and
frees, the patched WanModel runs, other Wan classes are refused; ``--no-contract`` skips it). With
``--beside DIR...`` other packs (e.g. ComfyUI-WanVideoWrapper, which registers a FantasyPortrait
loader of its own) are linked into ``custom_nodes`` too, and every node id of ours must be served by
this pack and no display name of ours shown by another node.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "ComfyUI-FantasyPortrait"
CHECK_PACK = "_fantasyportrait_check_nodes"
DATA = os.environ.get("FANTASYPORTRAIT_DATA", os.path.join(ROOT, "..", "shared", "data"))

CHECK_NODES = '''
"""Check-only stand-ins (see ComfyUI-FantasyPortrait/scripts/check_in_comfyui.py)."""
import torch


class _ClipVisionOutput:
    def __init__(self, **kw):
        self.__dict__.update(kw)

    def __getitem__(self, key):
        return self.__dict__[key]


class FPCheckTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True}), "dim": ("INT", {"default": 32})}}
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = "_check"

    def run(self, text, dim):
        g = torch.Generator().manual_seed(len(text))
        cond = torch.zeros(1, 512, dim)
        cond[:, :20] = torch.randn(1, 20, dim, generator=g)  # real tokens, zero padding (like umT5 in ComfyUI)
        return ([[cond, {"pooled_output": None}]],)


class FPCheckClipVisionEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "dim": ("INT", {"default": 16})}}
    RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
    FUNCTION = "run"
    CATEGORY = "_check"

    def run(self, image, dim):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(1, 257, dim, generator=g)
        return (_ClipVisionOutput(last_hidden_state=h, penultimate_hidden_states=h, image_embeds=h[:, 0]),)


NODE_CLASS_MAPPINGS = {"FPCheckTextEncode": FPCheckTextEncode, "FPCheckClipVisionEncode": FPCheckClipVisionEncode}
'''

MAKE_VAE = r'''
import sys, torch
sys.path.insert(0, sys.argv[1])
from comfy.cli_args import args
args.cpu = True
import comfy.ldm.wan.vae as wv
from safetensors.torch import save_file
torch.manual_seed(0)
vae = wv.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True])
sd = {}
for k, v in vae.state_dict().items():
    if k.endswith("gamma"):
        sd[k] = torch.ones_like(v)
    elif v.ndim > 1:
        sd[k] = torch.randn_like(v) * 0.02
    else:
        sd[k] = torch.zeros_like(v)
save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, sys.argv[2])
'''


def write_models(models_dir: str, comfy_dir: str, comfy_python: str) -> dict:
    """Tiny transformer + adapter (+ pd_fpg) in our formats; random Wan VAE in ComfyUI's format."""
    sys.path.insert(0, ROOT)
    import torch

    from fantasyportrait_core.model.build import random_tiny_models
    from fantasyportrait_core.weights import tiny as W
    transformer, adapter, _, encoder = random_tiny_models(seed=0)
    for sub in ("diffusion_models", "fantasyportrait", "vae"):
        os.makedirs(os.path.join(models_dir, sub), exist_ok=True)
    names = {"transformer": "tiny_wan_i2v.safetensors", "adapter": "tiny_fantasyportrait.safetensors",
             "pd_fpg": "tiny_pd_fpg.pth", "vae": "tiny_wan_vae.safetensors"}
    W.write_wan_original(transformer, os.path.join(models_dir, "diffusion_models", names["transformer"]))
    # a sharded release in a subfolder, as the official one: the multi workflow picks its 2nd shard
    os.makedirs(os.path.join(models_dir, "diffusion_models", "tiny_wan_sharded"))
    W.write_wan_original(transformer, os.path.join(models_dir, "diffusion_models", "tiny_wan_sharded",
                                                   "tiny_wan_i2v.safetensors"), shards=3)
    names["transformer_sharded"] = "tiny_wan_sharded/tiny_wan_i2v-00002-of-00003.safetensors"
    W.write_adapter_repacked(adapter, os.path.join(models_dir, "fantasyportrait", names["adapter"]), encoder)
    W.write_pd_fpg(encoder, os.path.join(models_dir, "fantasyportrait", names["pd_fpg"]))
    # a tiny LoRA in lightx2v's published layout (diffusion_model.*.lora_down/up + diff_b, norm diff, diff_m)
    os.makedirs(os.path.join(models_dir, "loras"), exist_ok=True)
    names["lora"] = "tiny_lightx2v_step_distill.safetensors"
    W.write_wan_lora(transformer, os.path.join(models_dir, "loras", names["lora"]), lightx2v=True)
    subprocess.run([comfy_python, "-c", MAKE_VAE, comfy_dir, os.path.join(models_dir, "vae", names["vae"])], check=True)
    # FlashPortrait's release layout (transformer.pt with emo_{k,v}_proj + portrait_encoder.pt) in subfolders
    flash = W.write_flashportrait(transformer, adapter, os.path.join(models_dir, "diffusion_models", "tiny_flashportrait"))
    os.makedirs(os.path.join(models_dir, "fantasyportrait", "tiny_flashportrait"), exist_ok=True)
    os.replace(flash["adapter"], os.path.join(models_dir, "fantasyportrait", "tiny_flashportrait", "portrait_encoder.pt"))
    names["flash_transformer"] = "tiny_flashportrait/transformer.pt"
    names["flash_adapter"] = "tiny_flashportrait/portrait_encoder.pt"
    names["text_dim"] = transformer.config.text_dim
    names["image_dim"] = transformer.config.image_dim
    names.update(write_native_models(models_dir))
    del torch
    return names


def write_native_models(models_dir: str) -> dict:
    """For the native workflow: the smallest Wan2.1-I2V checkpoint ComfyUI's model detection takes as
    WAN21_I2V (original key layout, 2 blocks, head size 128, umT5 / CLIP-H widths), its adapter, and
    a rank-4 LoRA on the blocks' cross-attention q / o in ComfyUI's key style."""
    import torch
    from safetensors.torch import save_file

    from fantasyportrait_core.weights import tiny as W
    transformer, adapter = W.tiny_native_models(seed=0)
    os.makedirs(os.path.join(models_dir, "loras"), exist_ok=True)
    names = {"native_unet": "tiny_wan21_i2v_native.safetensors", "native_adapter": "tiny_fantasyportrait_native.safetensors",
             "native_lora": "tiny_wan_lora.safetensors", "native_text_dim": transformer.config.text_dim,
             "native_image_dim": transformer.config.image_dim}
    W.write_wan_original(transformer, os.path.join(models_dir, "diffusion_models", names["native_unet"]))
    W.write_adapter_repacked(adapter, os.path.join(models_dir, "fantasyportrait", names["native_adapter"]))
    g = torch.Generator().manual_seed(0)
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    lora = {}
    for i in range(transformer.config.num_layers):
        for name in ("q", "o"):
            key = f"diffusion_model.blocks.{i}.cross_attn.{name}"
            lora[key + ".lora_down.weight"] = torch.randn(4, dim, generator=g) * 0.1
            lora[key + ".lora_up.weight"] = torch.randn(dim, 4, generator=g) * 0.1
            lora[key + ".alpha"] = torch.tensor(4.0)
    save_file(lora, os.path.join(models_dir, "loras", names["native_lora"]))
    names.update(write_wan22_models(models_dir))
    return names


def write_wan22_models(models_dir: str) -> dict:
    """For the Wan2.2 workflow (experimental): two tiny Wan2.2-I2V-A14B experts (no img_emb, 36 input
    channels; ComfyUI types each WAN21_T2V) in the Comfy-Org repack layout, named as the released ones."""
    from fantasyportrait_core.weights import tiny as W
    from fantasyportrait_core.weights.keys import COMFY_PREFIX

    high, low = W.tiny_native_wan22_experts(seed=1)
    names = {"native_wan22_high": "tiny_wan2.2_i2v_high_noise.safetensors",
             "native_wan22_low": "tiny_wan2.2_i2v_low_noise.safetensors"}
    W.write_wan_original(high, os.path.join(models_dir, "diffusion_models", names["native_wan22_high"]), prefix=COMFY_PREFIX)
    W.write_wan_original(low, os.path.join(models_dir, "diffusion_models", names["native_wan22_low"]), prefix=COMFY_PREFIX)
    return names


def write_performance(path: str, frames: int = 97):
    """The saved performance the directed workflow loads: seeded features (the tiny encoder's are no
    more meaningful) on a still face track, written by the pack's own ``save_performance``."""
    sys.path.insert(0, ROOT)
    import numpy as np
    import torch

    from fantasyportrait_core.faces.face import FaceTrack
    from fantasyportrait_core.drive.performance import save_performance
    from fantasyportrait_core.drive.encode import DrivingExpression

    g = torch.Generator().manual_seed(0)
    lm = np.array([[200, 220], [300, 220], [250, 280], [210, 340], [290, 340]], dtype=float)
    track = FaceTrack(np.tile([150.0, 150, 350, 400], (frames, 1)), np.tile(lm, (frames, 1, 1)), np.ones(frames, bool))
    save_performance(path, DrivingExpression(torch.randn(frames, 554, generator=g), track, source="jgz.mp4", fps=25.0))


def get(url: str, data: dict | None = None, timeout: float = 30):
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """UI-format workflow -> API prompt, mapping widgets_values onto widget inputs in definition order."""
    links = {l[0]: l for l in workflow["links"]}
    by_id = {n["id"]: n for n in workflow["nodes"]}

    def source(link_id):
        """(node id, slot) feeding a link; a bypassed node (mode 4) passes its input of the output's type
        through, as the UI does."""
        l = links[link_id]
        node = by_id[l[1]]
        while node.get("mode", 0) == 4:
            typ = node["outputs"][l[2]]["type"]
            through = next((i for i in node.get("inputs", []) if i["type"] == typ and i.get("link") is not None), None)
            if through is None:
                return None
            l = links[through["link"]]
            node = by_id[l[1]]
        return [str(l[1]), l[2]]

    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] == "Note":
            continue
        info = object_info[node["type"]]
        linked = {}
        for sock in node.get("inputs", []):
            if sock.get("link") is not None:
                src = source(sock["link"])
                if src is not None:
                    linked[sock["name"]] = src
        inputs = dict(linked)
        values = list(node.get("widgets_values", []))
        order = list(info["input"].get("required", {}).items()) + list(info["input"].get("optional", {}).items())
        for name, spec in order:
            typ = spec[0]
            opts = spec[1] if len(spec) > 1 else {}
            is_widget = isinstance(typ, list) or typ in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
            if not is_widget:
                continue
            if not values:
                break
            value = values.pop(0)
            if name not in linked:
                inputs[name] = value
            if opts.get("control_after_generate") or (name == "seed" and values and values[0] in
                                                      ("fixed", "randomize", "increment", "decrement")):
                values.pop(0)
            if opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload"):
                if values and values[0] in ("image", "video", "audio", None):
                    values.pop(0)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def adapt_for_check(prompt: dict, names: dict, length: int, size: tuple[int, int], transformer: str) -> dict:
    """Swap the big text/CLIP models for the check stand-ins; use the tiny files; shrink the job."""
    out = {}
    for nid, node in prompt.items():
        ct, inp = node["class_type"], dict(node["inputs"])
        if ct in ("CLIPLoader", "CLIPVisionLoader"):
            continue
        if ct == "CLIPTextEncode":
            ct, inp = "FPCheckTextEncode", {"text": inp["text"], "dim": names["text_dim"]}
        elif ct == "CLIPVisionEncode":
            ct, inp = "FPCheckClipVisionEncode", {"image": inp["image"], "dim": names["image_dim"]}
        elif ct == "FantasyPortraitWanModelLoader":
            adapter = names["flash_adapter"] if transformer == names.get("flash_transformer") else names["adapter"]
            inp.update(transformer=transformer, adapter=adapter, weight_dtype="bf16", storage="fp8_e4m3fn")
        elif ct == "FantasyPortraitExpressionEncoderLoader":
            inp["encoder"] = names["pd_fpg"]
        elif ct == "VAELoader":
            inp["vae_name"] = names["vae"]
        elif ct == "WanImageToVideo":
            inp.update(width=size[0], height=size[1], length=length)
        elif ct == "FantasyPortraitLoRA":
            inp["lora_name"] = names["lora"]
        elif ct == "FantasyPortraitSampler":
            inp["steps"] = 2
        elif ct == "FantasyPortraitEncodeExpression":
            inp["max_frames"] = length  # encode only the frames generated
        elif ct == "UNETLoader" and "high_noise" in inp["unet_name"]:  # Wan2.2 workflow
            inp["unet_name"] = names["native_wan22_high"]
        elif ct == "UNETLoader" and "low_noise" in inp["unet_name"]:
            inp["unet_name"] = names["native_wan22_low"]
        elif ct == "UNETLoader":  # native workflow
            inp["unet_name"] = names["native_unet"]
        elif ct == "KSamplerAdvanced":  # Wan2.2 workflow: 2 steps, split after the first as 20 at 10
            inp.update(steps=2, start_at_step=min(inp["start_at_step"], 1), end_at_step=min(inp["end_at_step"], 1)
                       if inp["end_at_step"] < 10000 else 10000)
        elif ct == "FantasyPortraitAdapterLoader":
            inp["adapter"] = names["native_adapter"]
        elif ct == "LoraLoaderModelOnly":
            inp["lora_name"] = names["native_lora"]
        elif ct == "BasicScheduler":
            inp["steps"] = 2
        out[nid] = {"class_type": ct, "inputs": inp}
    if any(n["class_type"] == "UNETLoader" for n in out.values()):  # ComfyUI's Wan: umT5 / CLIP-H widths
        for n in out.values():
            if n["class_type"] == "FPCheckTextEncode":
                n["inputs"]["dim"] = names["native_text_dim"]
            elif n["class_type"] == "FPCheckClipVisionEncode":
                n["inputs"]["dim"] = names["native_image_dim"]
    return out


def probe(path: str) -> dict:
    sys.path.insert(0, ROOT)
    from fantasyportrait_core.media.video import probe_video

    return probe_video(path)


def resolve_python(comfy: str, python: str | None) -> str:
    """ComfyUI's python: the one given, else COMFYUI_DIR/venv/bin/python, else this one."""
    venv = os.path.join(comfy, "venv", "bin", "python")
    return python or (venv if os.path.exists(venv) else sys.executable)


@contextlib.contextmanager
def comfyui_session(comfy: str, py: str, port: int, keep: bool = False, beside: tuple = ()):
    """A real ComfyUI serving this pack with tiny random checkpoints, for the duration of the block.

    Writes the models (:func:`write_models`), links this pack and the check-only stand-in nodes
    into ``custom_nodes``, starts ``main.py --cpu`` on loopback and waits for ``/object_info``.
    Yields a namespace with ``base`` (URL), ``info`` (object_info), ``names`` (model names), ``tmp``,
    ``out_dir``, ``in_dir``, ``log_path``, ``server`` (the Popen) and ``started_s``; on exit stops
    the server and removes the links and (unless ``keep``) the temporary folder. ``beside``: other
    packs' folders (e.g. ComfyUI-WanVideoWrapper) linked into ``custom_nodes`` for the session too. Used
    by :func:`main` and ``scripts/soak_comfyui.py``.

    Raises:
        RuntimeError: ComfyUI did not answer within 3 minutes (names its log).
    """
    tmp = tempfile.mkdtemp(prefix="fp_check_")
    models = os.path.join(tmp, "models")
    out_dir, in_dir, user_dir = (os.path.join(tmp, d) for d in ("output", "input", "user"))
    for d in (out_dir, in_dir, user_dir):
        os.makedirs(d)
    for f in ("man.jpeg", "two_person.png", "jgz.mp4", "biden.mp4", "trump.mp4"):
        shutil.copy(os.path.join(DATA, f), in_dir)
    write_performance(os.path.join(in_dir, "jgz_performance.safetensors"))
    link = os.path.join(comfy, "custom_nodes", PACK_NAME)
    check_pack = os.path.join(comfy, "custom_nodes", CHECK_PACK)
    created_link = False
    server = None
    other_links = []
    try:
        for d in beside:
            other = os.path.join(comfy, "custom_nodes", os.path.basename(os.path.normpath(d)))
            if not os.path.exists(other):
                os.symlink(os.path.abspath(d), other)
                other_links.append(other)
        names = write_models(models, comfy, py)
        extra = os.path.join(tmp, "extra_model_paths.yaml")
        with open(extra, "w") as f:
            f.write(f"fp_check:\n  base_path: {models}\n  diffusion_models: diffusion_models\n"
                    f"  vae: vae\n  fantasyportrait: fantasyportrait\n  loras: loras\n")
        created_link = not os.path.exists(link)
        if created_link:
            os.symlink(ROOT, link)
        os.makedirs(check_pack, exist_ok=True)
        with open(os.path.join(check_pack, "__init__.py"), "w") as f:
            f.write(CHECK_NODES)
        log_path = os.path.join(tmp, "comfyui.log")
        server = subprocess.Popen(
            [py, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--extra-model-paths-config",
             extra, "--output-directory", out_dir, "--input-directory", in_dir, "--user-directory", user_dir,
             "--disable-auto-launch"], cwd=comfy, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        t0 = time.time()
        while True:
            try:
                info = get(base + "/object_info", timeout=10)
                break
            except Exception:
                if server.poll() is not None or time.time() - t0 > 180:
                    raise RuntimeError("ComfyUI did not start; see " + log_path)
                time.sleep(1)
        yield types.SimpleNamespace(base=base, info=info, names=names, tmp=tmp, out_dir=out_dir, in_dir=in_dir,
                                    log_path=log_path, server=server, started_s=time.time() - t0)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        if created_link:
            os.unlink(link)
        for other in other_links:
            os.unlink(other)
        shutil.rmtree(check_pack, ignore_errors=True)
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def run_prompt(base: str, prompt: dict, timeout: float = 900, client_id: str = "fp-check") -> dict:
    """Queue ``prompt`` through ``/prompt`` and wait for its history entry.

    Returns:
        ``{"rejected": node_errors}`` when validation refused it, else ``{"prompt_id", "status"
        ("success"/"error"), "error" (exception message or None), "outputs", "seconds"}``.
    Raises:
        RuntimeError: no result within ``timeout`` seconds.
    """
    t1 = time.time()
    try:
        res = get(base + "/prompt", {"prompt": prompt, "client_id": client_id})
    except urllib.error.HTTPError as e:  # ComfyUI answers 400 with the validation errors
        res = json.loads(e.read() or b"{}")
    if res.get("node_errors") or res.get("error"):
        return {"rejected": res.get("node_errors") or res.get("error")}
    pid = res["prompt_id"]
    while True:
        hist = get(f"{base}/history/{pid}")
        status = hist.get(pid, {}).get("status", {})
        if status.get("completed") is not None or status.get("status_str") in ("success", "error"):
            break
        if time.time() - t1 > timeout:
            raise RuntimeError(f"prompt {pid} did not finish in {timeout:.0f} s")
        time.sleep(0.5)
    msgs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
    return {"prompt_id": pid, "status": status.get("status_str"), "outputs": hist[pid].get("outputs", {}),
            "error": msgs[0][1].get("exception_message", "") if msgs else None, "seconds": time.time() - t1}


def output_videos(result: dict) -> list[dict]:
    """The MP4 outputs (SaveVideo entries) of a finished prompt."""
    return [v for o in result.get("outputs", {}).values() for v in o.get("images", [])
            if v.get("filename", "").endswith(".mp4")]


def screenshots(args, base: str, tmp: str, checked: dict, summary: list) -> bool:
    """Run the browser check on every example workflow, the checked ones queued from the UI."""
    get(base + "/free", {"free_memory": True})  # empty the execution cache: the UI run executes every node
    time.sleep(3)
    runs = []
    for wf_name, prompt in checked.items():
        path = os.path.join(tmp, "ui_" + wf_name)
        with open(path, "w") as f:
            json.dump(prompt, f)
        runs.append(f"{wf_name[:-5].replace('fantasyportrait_', '')}={path}")
    workflows = sorted(os.path.join("workflows", f) for f in os.listdir(os.path.join(ROOT, "workflows"))
                       if f.endswith(".json"))
    width, height = args.shot_size.split("x")
    env = dict(os.environ, CHROMIUM=args.chromium, **({"NODE_PATH": args.node_path} if args.node_path else {}))
    res = subprocess.run(["node", os.path.join(ROOT, "scripts", "screenshot_workflows.mjs"), "--url", base,
                          "--out", os.path.abspath(args.screenshots), "--workflows", ",".join(workflows),
                          "--run", ",".join(runs), "--width", width, "--height", height],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    lines = [l for l in res.stdout.splitlines() if l.strip()]
    summary.append(f"browser UI ({len(workflows)} workflows, {len(runs)} run from the UI): "
                   f"{'OK' if res.returncode == 0 else 'PROBLEMS'}")
    summary.extend("  " + l for l in lines)
    if res.returncode not in (0, 1):
        summary.append("  " + res.stderr.strip()[-1500:])
    return res.returncode == 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("comfyui_dir")
    ap.add_argument("--port", type=int, default=8199)
    ap.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON"),
                    help="ComfyUI's python (default: COMFYUI_DIR/venv/bin/python or this python)")
    ap.add_argument("--length", type=int, default=9)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--workflows", default="", help="comma-separated workflow names to run (e.g. 'native'); "
                                                     "default: all")
    ap.add_argument("--timeout", type=float, default=900, help="seconds one workflow may take")
    ap.add_argument("--screenshots", metavar="DIR", help="after the checks, run the workflows in the browser UI and "
                                                         "save workflow_<name>.png screenshots in DIR")
    ap.add_argument("--node-path", default=os.environ.get("NODE_PATH"), help="node_modules with playwright-core")
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    ap.add_argument("--shot-size", default="1920x1080", help="browser viewport for the screenshots, WxH")
    ap.add_argument("--beside", nargs="*", default=[], metavar="PACK_DIR",
                    help="other node packs to install beside this one for the check (e.g. a ComfyUI-WanVideoWrapper "
                         "checkout): every node id of ours must still be served by this pack")
    ap.add_argument("--no-contract", action="store_true", help="skip the contract probe (scripts/comfy_contract.py)")
    args = ap.parse_args(argv)
    comfy = os.path.abspath(args.comfyui_dir)
    py = resolve_python(comfy, args.python)
    if not os.path.isfile(os.path.join(comfy, "main.py")):
        print(f"{comfy} is not a ComfyUI checkout (no main.py)")
        return 2
    summary, ok = [], True
    try:
        if not args.no_contract:
            ok &= contract(comfy, py, summary)
        with comfyui_session(comfy, py, args.port, args.keep, tuple(args.beside)) as session:
            if args.keep:
                summary.append(f"keeping {session.tmp}")
            if args.beside:
                ok &= ids_served_by_us(session, summary)
            checked = {}  # workflow file -> the API prompt that ran (for the browser run)
            ok &= check_session(session, args.length, [w.strip() for w in args.workflows.split(",") if w.strip()],
                                summary, timeout=args.timeout, checked=checked)
            if args.screenshots:
                ok &= screenshots(args, session.base, session.tmp, checked, summary)
    except Exception as e:  # report, then clean up
        ok = False
        summary.append(f"ERROR: {e}")
    print("FantasyPortrait check in ComfyUI", comfy)
    for line in summary:
        print(" -", line)
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def check_saved_performance(out_dir: str, res: dict, summary: list, wf_name: str) -> bool:
    """Save Performance wrote a file that loads back; what Direct Expression reported."""
    import glob

    from fantasyportrait_core.drive.performance import load_performance

    files = sorted(glob.glob(os.path.join(out_dir, "fantasyportrait_performances", "*.safetensors")))
    texts = [t for o in res.get("outputs", {}).values() for t in o.get("text", []) if "head_pose" in str(t)]
    if not files:
        summary.append(f"{wf_name}: Save Performance wrote no file")
        return False
    perf = load_performance(files[-1])
    summary.append(f"{wf_name}: saved {os.path.basename(files[-1])} ({perf.num_frames} frames of {perf.label}) loads "
                   f"back; Direct Expression: {texts[0] if texts else 'NO INFO SHOWN'}")
    return bool(texts)


def contract(comfy: str, py: str, summary: list) -> bool:
    """scripts/comfy_contract.py in ComfyUI's python: every ComfyUI symbol the pack uses
    binds, the resident model is a ModelPatcher core loads and frees, the patched WanModel runs."""
    out = os.path.join(tempfile.mkdtemp(prefix="fp_contract_"), "probe.json")
    run = subprocess.run([py, os.path.join(ROOT, "scripts", "comfy_contract.py"), comfy, out],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    if run.returncode != 0 or not os.path.isfile(out):
        summary.append("contract probe FAILED to run: " + run.stderr.strip()[-800:])
        return False
    with open(out) as f:
        results = json.load(f)["results"]
    shutil.rmtree(os.path.dirname(out), ignore_errors=True)
    bad = [r for r in results if not r["ok"]]
    summary.append(f"contract with this ComfyUI: {len(results) - len(bad)}/{len(results)} checks pass "
                   f"({sum(r['group'] == 'symbol' for r in results)} symbols bind, resident ModelPatcher, "
                   f"{sum(r['group'] == 'wan' for r in results)} Wan model classes)")
    summary.extend(f"  FAILED {r['group']} {r['name']}: {r['detail']}" for r in bad)
    return not bad


def ids_served_by_us(session, summary: list) -> bool:
    """With other packs installed beside us: every id of ours is served by this pack (its
    ``python_module``), and no display name of ours is shown by another node."""
    sys.path.insert(0, ROOT)
    import nodes as pack_nodes

    info = session.info
    ours = {k: v for k, v in info.items() if PACK_NAME in str(v.get("python_module", ""))}
    wrong = sorted(k for k in pack_nodes.NODE_CLASS_MAPPINGS if k not in ours)
    names = {v.get("display_name"): k for k, v in info.items() if k not in ours}
    same = sorted(n for n in pack_nodes.NODE_DISPLAY_NAME_MAPPINGS.values() if n in names)
    with open(session.log_path) as f:
        failed = [l.strip() for l in f if "IMPORT FAILED" in l]
    others = sorted({str(v.get("python_module", "")).split(".")[-1] for k, v in info.items() if k not in ours
                     and str(v.get("python_module", "")).startswith("custom_nodes.")} - {CHECK_PACK})
    summary.append(f"beside {', '.join(others) or 'no other pack'} ({len(info) - len(ours)} other node types"
                   + (f"; IMPORT FAILED: {failed}" if failed else "") + f"): our {len(ours)} ids served by us"
                   + (f", NOT ours: {wrong}" if wrong else "") + (f", display names shown twice: {same}" if same else ""))
    return not wrong and not same and not failed


def check_session(session, length: int, wanted: list[str], summary: list, timeout: float = 900,
                  checked: dict | None = None) -> bool:
    """The checks of :func:`main` against a running session; appends lines to ``summary`` and, when
    given, records in ``checked`` the API prompt each example workflow (as shipped) ran with."""
    ok = True
    info, names, base, out_dir, log_path = session.info, session.names, session.base, session.out_dir, session.log_path
    summary.append(f"ComfyUI answered /object_info after {session.started_s:.1f} s ({len(info)} node types)")
    with open(log_path) as f:
        failed = [l for l in f.read().splitlines() if "IMPORT FAILED" in l]
    if any(PACK_NAME in l for l in failed):
        ok = False
        summary.append("IMPORT FAILED: " + "; ".join(failed))
    sys.path.insert(0, ROOT)
    import nodes as pack_nodes  # our package: the node list to expect

    expected = set(pack_nodes.NODE_CLASS_MAPPINGS)
    missing = sorted(expected - set(info))
    ok &= not missing
    summary.append(f"nodes listed: {len(expected & set(info))}/{len(expected)}" + (f" MISSING {missing}" if missing else ""))

    runs = (("fantasyportrait_single.json", (64, 64), names["transformer"], False),
            ("fantasyportrait_multi.json", (112, 64), names["transformer_sharded"], False),  # ~ the graph's 720x416
            ("fantasyportrait_fast.json", (64, 64), names["transformer"], False),
            ("fantasyportrait_directed.json", (64, 64), names["transformer"], False),  # saved performance, directed
            # ComfyUI's own Wan MODEL (Load Diffusion Model), as shipped (LoRA bypassed) and with the LoRA on
            ("fantasyportrait_native.json", (64, 64), names["native_unet"], False),
            ("fantasyportrait_native.json", (64, 64), names["native_unet"], True),
            # FlashPortrait's transformer.pt + portrait_encoder.pt, two characters
            ("fantasyportrait_flash.json", (112, 64), names["flash_transformer"], False),
            # Wan2.2-I2V-A14B (experimental): two UNETLoaders, Patch Model on each expert, two KSamplerAdvanced
            ("fantasyportrait_wan22.json", (64, 64), names["native_wan22_high"], False))
    runs = [r for r in runs if not wanted or any(w in r[0] for w in wanted)]
    for wf_name, size, transformer, lora_on in runs:
        native_graph = "native" in wf_name or "wan22" in wf_name
        loader = ("UNETLoader", "unet_name") if native_graph else ("FantasyPortraitWanModelLoader", "transformer")
        if transformer not in json.dumps(info[loader[0]]["input"]["required"][loader[1]]):
            ok = False
            summary.append(f"{wf_name}: {transformer} is not offered by {loader[0]}")
            continue
        with open(os.path.join(ROOT, "workflows", wf_name)) as f:
            wf = json.load(f)
        if lora_on:
            for n in wf["nodes"]:
                if n["type"] == "LoraLoaderModelOnly":
                    n["mode"] = 0
            wf_name += " + LoRA"
        unknown = sorted({n["type"] for n in wf["nodes"]} - set(info) - {"Note"})
        if unknown:
            ok = False
            summary.append(f"{wf_name}: node types unknown to ComfyUI: {unknown}")
            continue
        prompt = adapt_for_check(ui_to_api(wf, info), names, length, size, transformer)
        if checked is not None and not lora_on:
            checked[wf_name] = prompt
        res = run_prompt(base, prompt, timeout=timeout)
        if "rejected" in res:
            ok = False
            summary.append(f"{wf_name}: rejected: {json.dumps(res['rejected'])[:800]}")
            continue
        if res["status"] != "success":
            ok = False
            summary.append(f"{wf_name}: FAILED: {str(res['error'])[:800]}")
            continue
        videos = output_videos(res)
        if not videos:
            ok = False
            summary.append(f"{wf_name}: no video output")
            continue
        v = videos[0]
        p = probe(os.path.join(out_dir, v.get("subfolder", ""), v["filename"]))
        good = p["frames"] == length and (p["width"], p["height"]) == size
        ok &= good
        summary.append(f"{wf_name}: {'OK' if good else 'WRONG'} -> {v['filename']}: {p['frames']} frames "
                       f"{p['width']}x{p['height']} @ {p['fps']:.2f} fps, audio={p['audio']} "
                       f"({res['seconds']:.1f} s; transformer {transformer})")
        if any(n["type"] == "FantasyPortraitSavePerformance" for n in wf["nodes"]):  # the file must load back
            ok &= check_saved_performance(out_dir, res, summary, wf_name)
        if "wan22" in wf_name:  # Patch Model ran on both experts (ComfyUI typed each as Wan2.2 expert)
            with open(log_path) as f:
                patched = sum("Patch Model on a Wan2.2-I2V-A14B expert" in l for l in f)
            ok &= patched >= 2
            summary.append(f"{wf_name}: Patch Model on a Wan2.2-I2V-A14B expert logged {patched}x (both experts: >= 2)")
        if any(n["type"] == "FantasyPortraitLoRA" for n in wf["nodes"]):  # the LoRA must have been applied
            with open(log_path) as f:
                active = [l.strip() for l in f if "LoRAs active" in l and names["lora"] in l]
            ok &= bool(active)
            summary.append(f"{wf_name}: " + (active[-1] if active else f"LoRA {names['lora']} was NOT applied"))
    return ok


if __name__ == "__main__":
    sys.exit(main())

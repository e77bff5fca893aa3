"""Write the example workflows (ComfyUI UI format) in workflows/.

    python scripts/make_workflows.py

The graphs are described here once (nodes, widget values, links by socket name) so ids, slots and
link tables stay consistent; the JSON files are what users load.
"""

from __future__ import annotations

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Socket layout of every node type used: (inputs [(name, type, optional)], outputs [(name, type)]).
SOCKETS = {
    "CLIPLoader": ([], [("CLIP", "CLIP")]),
    "CLIPTextEncode": ([("clip", "CLIP", False)], [("CONDITIONING", "CONDITIONING")]),
    "CLIPVisionLoader": ([], [("CLIP_VISION", "CLIP_VISION")]),
    "CLIPVisionEncode": ([("clip_vision", "CLIP_VISION", False), ("image", "IMAGE", False)],
                         [("CLIP_VISION_OUTPUT", "CLIP_VISION_OUTPUT")]),
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "VAELoader": ([], [("VAE", "VAE")]),
    "WanImageToVideo": ([("positive", "CONDITIONING", False), ("negative", "CONDITIONING", False), ("vae", "VAE", False),
                         ("clip_vision_output", "CLIP_VISION_OUTPUT", True), ("start_image", "IMAGE", True)],
                        [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT", False), ("vae", "VAE", False)], [("IMAGE", "IMAGE")]),
    "LoadVideo": ([], [("VIDEO", "VIDEO")]),
    "GetVideoComponents": ([("video", "VIDEO", False)], [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")]),
    "CreateVideo": ([("images", "IMAGE", False), ("audio", "AUDIO", True)], [("VIDEO", "VIDEO")]),
    "SaveVideo": ([("video", "VIDEO", False)], []),
    "PreviewImage": ([("images", "IMAGE", False)], []),
    "FantasyPortraitModelLoader": ([], [("model", "FANTASYPORTRAIT_MODEL")]),
    "FantasyPortraitExpressionEncoderLoader": ([], [("expression_encoder", "FP_EXPRESSION_ENCODER")]),
    "FantasyPortraitFaceDetectorLoader": ([], [("face_detector", "FP_FACE_DETECTOR")]),
    "FantasyPortraitEncodeExpression": ([("expression_encoder", "FP_EXPRESSION_ENCODER", False),
                                         ("face_detector", "FP_FACE_DETECTOR", False), ("images", "IMAGE", False)],
                                        [("expression", "FP_EXPRESSION"), ("aligned_faces", "IMAGE"), ("info", "STRING")]),
    "FantasyPortraitFaceMasks": ([("face_detector", "FP_FACE_DETECTOR", False), ("image", "IMAGE", False)],
                                 [("faces", "FP_FACES"), ("face_masks", "MASK"), ("preview", "IMAGE")]),
    "FantasyPortraitConditioning": ([("faces", "FP_FACES", False), ("expression", "FP_EXPRESSION", False),
                                     ("expression_2", "FP_EXPRESSION", True), ("expression_3", "FP_EXPRESSION", True),
                                     ("expression_4", "FP_EXPRESSION", True), ("masks", "MASK", True)],
                                    [("portrait", "FP_PORTRAIT"), ("preview", "IMAGE")]),
    "FantasyPortraitSampler": ([("model", "FANTASYPORTRAIT_MODEL", False), ("portrait", "FP_PORTRAIT", False),
                                ("positive", "CONDITIONING", False), ("negative", "CONDITIONING", False),
                                ("latent", "LATENT", False), ("sigmas", "SIGMAS", True)],
                               [("latent", "LATENT"), ("info", "STRING")]),
    "FantasyPortraitLoRA": ([("model", "FANTASYPORTRAIT_MODEL", False)], [("model", "FANTASYPORTRAIT_MODEL")]),
    # native-MODEL graph (fantasyportrait_native.json)
    "UNETLoader": ([], [("MODEL", "MODEL")]),
    "LoraLoaderModelOnly": ([("model", "MODEL", False)], [("MODEL", "MODEL")]),
    "ModelSamplingSD3": ([("model", "MODEL", False)], [("MODEL", "MODEL")]),
    "KSamplerSelect": ([], [("SAMPLER", "SAMPLER")]),
    "BasicScheduler": ([("model", "MODEL", False)], [("SIGMAS", "SIGMAS")]),
    "RandomNoise": ([], [("NOISE", "NOISE")]),
    "SamplerCustomAdvanced": ([("noise", "NOISE", False), ("guider", "GUIDER", False), ("sampler", "SAMPLER", False),
                               ("sigmas", "SIGMAS", False), ("latent_image", "LATENT", False)],
                              [("output", "LATENT"), ("denoised_output", "LATENT")]),
    "FantasyPortraitAdapterLoader": ([], [("adapter", "FANTASYPORTRAIT_ADAPTER")]),
    "FantasyPortraitPatchModel": ([("model", "MODEL", False), ("adapter", "FANTASYPORTRAIT_ADAPTER", False),
                                   ("portrait", "FP_PORTRAIT", False)], [("model", "MODEL")]),
    "FantasyPortraitGuider": ([("model", "MODEL", False), ("positive", "CONDITIONING", False),
                               ("negative", "CONDITIONING", False)], [("guider", "GUIDER")]),
}
# Sampler widgets after the reference ones: sampler, preset, denoise, cfg start/end, portrait cfg start/end,
# portrait scale per step range (defaults = the reference behaviour).
SAMPLER_DEFAULTS = ["euler", "none", 1.0, 0.0, 1.0, 0.0, 1.0, ""]
# Widgets turned into sockets (name, type) when something is linked to them.
WIDGET_SOCKETS = {"CreateVideo": [("fps", "FLOAT")]}

NEGATIVE = ("人物静止不动，静止，色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
            "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
            "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


class Graph:
    def __init__(self):
        self.nodes, self.links, self.groups = [], [], []

    def add(self, key, type_, pos, widgets=(), title=None, size=(320, 120)):
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [],
                "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets), "_key": key}
        if title:
            node["title"] = title
        ins, outs = SOCKETS[type_]
        for name, typ, optional in ins:
            sock = {"name": name, "type": typ, "link": None}
            if optional:
                sock["shape"] = 7
            node["inputs"].append(sock)
        for i, (name, typ) in enumerate(outs):
            node["outputs"].append({"name": name, "type": typ, "slot_index": i, "links": []})
        self.nodes.append(node)
        return node

    def _node(self, key):
        return next(n for n in self.nodes if n["_key"] == key)

    def link(self, src, out_name, dst, in_name):
        a, b = self._node(src), self._node(dst)
        slot_out = next(i for i, o in enumerate(a["outputs"]) if o["name"] == out_name)
        inputs = b["inputs"]
        slot_in = next((i for i, s in enumerate(inputs) if s["name"] == in_name), None)
        if slot_in is None:  # a widget converted to a socket
            typ = dict(WIDGET_SOCKETS[b["type"]])[in_name]
            inputs.append({"name": in_name, "type": typ, "widget": {"name": in_name}, "link": None})
            slot_in = len(inputs) - 1
        link_id = len(self.links) + 1
        typ = a["outputs"][slot_out]["type"]
        self.links.append([link_id, a["id"], slot_out, b["id"], slot_in, typ])
        a["outputs"][slot_out]["links"].append(link_id)
        inputs[slot_in]["link"] = link_id

    def group(self, title, bounding, color="#3f789e"):
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": list(bounding), "color": color,
                            "font_size": 24, "flags": {}})

    def to_json(self):
        nodes = []
        for n in self.nodes:
            n = {k: v for k, v in n.items() if k != "_key"}
            for o in n["outputs"]:
                o["links"] = o["links"] or None
            nodes.append(n)
        return {"last_node_id": len(nodes), "last_link_id": len(self.links), "nodes": nodes, "links": self.links,
                "groups": self.groups, "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [40, 40]}},
                "version": 0.4}


def common(g: Graph, image_name: str, width: int, height: int, length: int, prompt: str):
    """Models, text, CLIP vision, WanImageToVideo, sampler, decode and save."""
    g.add("model", "FantasyPortraitModelLoader", (0, 0), ["wan2.1_i2v_720p_14B_bf16.safetensors",
                                                          "Wan2_1_FantasyPortrait_fp16.safetensors",
                                                          "bf16", "auto", "auto", "off", "sdpa"], size=(360, 230))
    g.add("clip", "CLIPLoader", (0, 220), ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"])
    g.add("pos", "CLIPTextEncode", (380, 200), [prompt], title="Positive prompt", size=(360, 140))
    g.add("neg", "CLIPTextEncode", (380, 380), [NEGATIVE], title="Negative prompt (used when cfg > 1)",
          size=(360, 140))
    g.add("clipvision", "CLIPVisionLoader", (0, 380), ["clip_vision_h.safetensors"])
    g.add("vae", "VAELoader", (0, 520), ["wan_2.1_vae.safetensors"])
    g.add("image", "LoadImage", (0, 660), [image_name, "image"], title="Reference portrait", size=(320, 320))
    g.add("clipenc", "CLIPVisionEncode", (380, 560), ["none"])
    g.add("i2v", "WanImageToVideo", (780, 300), [width, height, length, 1], size=(320, 220))
    g.add("encoder", "FantasyPortraitExpressionEncoderLoader", (0, 1020), ["pd_fpg.pth"])
    g.add("detector", "FantasyPortraitFaceDetectorLoader", (0, 1140), ["mtcnn (offline)", 0.0])
    g.add("facemasks", "FantasyPortraitFaceMasks", (380, 720))
    g.add("facepreview", "PreviewImage", (380, 860), title="Faces found (#0 = leftmost)", size=(320, 260))
    g.add("cond", "FantasyPortraitConditioning", (1140, 720), [1.0, "left_to_right", ""], size=(340, 220))
    g.add("condpreview", "PreviewImage", (1500, 720), title="Which face each character drives", size=(320, 260))
    g.add("sampler", "FantasyPortraitSampler", (1140, 300), [42, "fixed", 30, 1.0, 4.0, 5.0, 81, 16, *SAMPLER_DEFAULTS],
          size=(340, 300))
    g.add("decode", "VAEDecode", (1500, 300))
    g.add("create", "CreateVideo", (1500, 420), [25])
    g.add("save", "SaveVideo", (1840, 300), ["video/FantasyPortrait", "auto", "auto"], size=(360, 420))
    for a, o, b, i in [("clip", "CLIP", "pos", "clip"), ("clip", "CLIP", "neg", "clip"),
                       ("clipvision", "CLIP_VISION", "clipenc", "clip_vision"), ("image", "IMAGE", "clipenc", "image"),
                       ("pos", "CONDITIONING", "i2v", "positive"), ("neg", "CONDITIONING", "i2v", "negative"),
                       ("vae", "VAE", "i2v", "vae"), ("clipenc", "CLIP_VISION_OUTPUT", "i2v", "clip_vision_output"),
                       ("image", "IMAGE", "i2v", "start_image"),
                       ("detector", "face_detector", "facemasks", "face_detector"), ("image", "IMAGE", "facemasks", "image"),
                       ("facemasks", "preview", "facepreview", "images"), ("facemasks", "faces", "cond", "faces"),
                       ("cond", "preview", "condpreview", "images"),
                       ("model", "model", "sampler", "model"), ("cond", "portrait", "sampler", "portrait"),
                       ("i2v", "positive", "sampler", "positive"), ("i2v", "negative", "sampler", "negative"),
                       ("i2v", "latent", "sampler", "latent"), ("sampler", "latent", "decode", "samples"),
                       ("vae", "VAE", "decode", "vae"), ("decode", "IMAGE", "create", "images"),
                       ("create", "VIDEO", "save", "video")]:
        g.link(a, o, b, i)


def driving(g: Graph, key: str, video: str, pos, people: int = 1):
    x, y = pos
    g.add(f"{key}_video", "LoadVideo", (x, y), [video, "image"], title=f"Driving video {key}", size=(320, 300))
    g.add(f"{key}_parts", "GetVideoComponents", (x + 340, y))
    g.add(f"{key}_expr", "FantasyPortraitEncodeExpression", (x + 340, y + 140), [people, 0.0], size=(340, 140))
    g.link(f"{key}_video", "VIDEO", f"{key}_parts", "video")
    g.link(f"{key}_parts", "images", f"{key}_expr", "images")
    g.link("encoder", "expression_encoder", f"{key}_expr", "expression_encoder")
    g.link("detector", "face_detector", f"{key}_expr", "face_detector")


def single() -> dict:
    g = Graph()
    common(g, "man.jpeg", 720, 720, 57, "A man talks to the camera with lively facial expressions.")
    driving(g, "A", "jgz.mp4", (380, 1180))
    g.link("A_expr", "expression", "cond", "expression")
    g.link("A_parts", "audio", "create", "audio")  # the driving video's sound goes to the output
    g.link("A_parts", "fps", "create", "fps")
    return g.to_json()


def multi() -> dict:
    g = Graph()
    common(g, "two_person.png", 832, 480, 81, "Two people talk to each other with lively facial expressions.")
    driving(g, "A", "biden.mp4", (380, 1180))  # character 0 = leftmost face
    driving(g, "B", "trump.mp4", (380, 1640))  # character 1 = next face to the right
    g.link("A_expr", "expression", "cond", "expression")
    g.link("B_expr", "expression", "cond", "expression_2")
    g.link("A_parts", "audio", "create", "audio")  # first driver's sound (these two clips have none)
    g.link("A_parts", "fps", "create", "fps")
    return g.to_json()


def native() -> dict:
    """One character on ComfyUI's own Wan2.1 I2V MODEL: Load Diffusion Model (bf16 / fp8; a GGUF loader
    fits the same socket), an optional LoraLoaderModelOnly (bypassed; e.g. the lightx2v step-distill
    LoRA, then steps 4-8, cfg 1), FantasyPortrait Patch Model + Guider, SamplerCustomAdvanced."""
    g = Graph()
    g.add("unet", "UNETLoader", (0, 0), ["wan2.1_i2v_720p_14B_fp8_e4m3fn.safetensors", "default"], size=(360, 90))
    lora = g.add("lora", "LoraLoaderModelOnly", (0, 120),
                 ["lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors", 1.0],
                 title="LoRA (optional: Ctrl+B to enable)", size=(360, 90))
    lora["mode"] = 4  # bypassed: the MODEL passes through unchanged
    g.add("shift", "ModelSamplingSD3", (0, 240), [5.0], title="Shift 5 (reference)", size=(360, 60))
    g.add("adapter", "FantasyPortraitAdapterLoader", (0, 330), ["Wan2_1_FantasyPortrait_fp16.safetensors", "auto"],
          size=(360, 90))
    g.add("clip", "CLIPLoader", (0, 450), ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"])
    g.add("pos", "CLIPTextEncode", (380, 430), ["A man talks to the camera with lively facial expressions."],
          title="Positive prompt", size=(360, 140))
    g.add("neg", "CLIPTextEncode", (380, 600), [NEGATIVE], title="Negative prompt (used when cfg > 1)", size=(360, 140))
    g.add("clipvision", "CLIPVisionLoader", (0, 600), ["clip_vision_h.safetensors"])
    g.add("vae", "VAELoader", (0, 740), ["wan_2.1_vae.safetensors"])
    g.add("image", "LoadImage", (0, 880), ["man.jpeg", "image"], title="Reference portrait", size=(320, 320))
    g.add("clipenc", "CLIPVisionEncode", (380, 780), ["none"])
    g.add("i2v", "WanImageToVideo", (780, 520), [720, 720, 57, 1], size=(320, 220))
    g.add("encoder", "FantasyPortraitExpressionEncoderLoader", (0, 1240), ["pd_fpg.pth"])
    g.add("detector", "FantasyPortraitFaceDetectorLoader", (0, 1360), ["mtcnn (offline)", 0.0])
    g.add("facemasks", "FantasyPortraitFaceMasks", (380, 940))
    g.add("facepreview", "PreviewImage", (380, 1080), title="Faces found (#0 = leftmost)", size=(320, 260))
    g.add("cond", "FantasyPortraitConditioning", (780, 940), [1.0, "left_to_right", ""], size=(340, 220))
    g.add("patch", "FantasyPortraitPatchModel", (780, 120), size=(320, 90))
    g.add("guider", "FantasyPortraitGuider", (1140, 120), [1.0, 4.0], size=(320, 130))
    g.add("noise", "RandomNoise", (1140, 280), [42, "fixed"], size=(320, 90))
    g.add("sampler", "KSamplerSelect", (1140, 400), ["euler"], size=(320, 60))
    g.add("sigmas", "BasicScheduler", (1140, 490), ["simple", 30, 1.0], size=(320, 110))
    g.add("sample", "SamplerCustomAdvanced", (1500, 120), size=(320, 300))
    g.add("decode", "VAEDecode", (1500, 460))
    g.add("create", "CreateVideo", (1500, 560), [25])
    g.add("save", "SaveVideo", (1840, 120), ["video/FantasyPortrait_native", "auto", "auto"], size=(360, 420))
    driving(g, "A", "jgz.mp4", (380, 1400))
    for a, o, b, i in [("unet", "MODEL", "lora", "model"), ("lora", "MODEL", "shift", "model"),
                       ("shift", "MODEL", "patch", "model"), ("adapter", "adapter", "patch", "adapter"),
                       ("cond", "portrait", "patch", "portrait"), ("patch", "model", "guider", "model"),
                       ("patch", "model", "sigmas", "model"),
                       ("clip", "CLIP", "pos", "clip"), ("clip", "CLIP", "neg", "clip"),
                       ("clipvision", "CLIP_VISION", "clipenc", "clip_vision"), ("image", "IMAGE", "clipenc", "image"),
                       ("pos", "CONDITIONING", "i2v", "positive"), ("neg", "CONDITIONING", "i2v", "negative"),
                       ("vae", "VAE", "i2v", "vae"), ("clipenc", "CLIP_VISION_OUTPUT", "i2v", "clip_vision_output"),
                       ("image", "IMAGE", "i2v", "start_image"),
                       ("detector", "face_detector", "facemasks", "face_detector"), ("image", "IMAGE", "facemasks", "image"),
                       ("facemasks", "preview", "facepreview", "images"), ("facemasks", "faces", "cond", "faces"),
                       ("A_expr", "expression", "cond", "expression"),
                       ("i2v", "positive", "guider", "positive"), ("i2v", "negative", "guider", "negative"),
                       ("noise", "NOISE", "sample", "noise"), ("guider", "guider", "sample", "guider"),
                       ("sampler", "SAMPLER", "sample", "sampler"), ("sigmas", "SIGMAS", "sample", "sigmas"),
                       ("i2v", "latent", "sample", "latent_image"), ("sample", "output", "decode", "samples"),
                       ("vae", "VAE", "decode", "vae"), ("decode", "IMAGE", "create", "images"),
                       ("A_parts", "audio", "create", "audio"), ("A_parts", "fps", "create", "fps"),
                       ("create", "VIDEO", "save", "video")]:
        g.link(a, o, b, i)
    return g.to_json()


LIGHTX2V_LORA = "Wan21_I2V_14B_lightx2v_cfg_step_distill_lora_rank64_bf16.safetensors"


def fast() -> dict:
    """The single-character graph in few-step mode: lightx2v step-distill LoRA (FantasyPortrait LoRA
    node between the model loader and the sampler), the sampler's lightx2v preset (4 steps, cfg 1),
    portrait guidance on the first half of the steps only (2 + 2 + 1 + 1 transformer passes)."""
    g = Graph()
    common(g, "man.jpeg", 720, 720, 57, "A man talks to the camera with lively facial expressions.")
    driving(g, "A", "jgz.mp4", (380, 1180))
    g.link("A_expr", "expression", "cond", "expression")
    g.link("A_parts", "audio", "create", "audio")
    g.link("A_parts", "fps", "create", "fps")
    model, sampler = g._node("model"), g._node("sampler")
    lora = g.add("lora", "FantasyPortraitLoRA", (model["pos"][0], model["pos"][1] - 130), [LIGHTX2V_LORA, 1.0],
                 title="LoRA: lightx2v step distill (chain more LoRA nodes for styles)", size=(360, 100))
    # model -> sampler becomes model -> LoRA -> sampler (the link keeps its id, its source moves to the LoRA)
    link = next(l for l in g.links if l[3] == sampler["id"] and sampler["inputs"][l[4]]["name"] == "model")
    model["outputs"][link[2]]["links"].remove(link[0])
    link[1], link[2] = lora["id"], 0
    lora["outputs"][0]["links"].append(link[0])
    g.link("model", "model", "lora", "model")
    sampler["title"] = "FantasyPortrait Sampler (lightx2v preset: 4 steps, cfg 1)"
    sampler["widgets_values"] = [42, "fixed", 4, 1.0, 4.0, 5.0, 81, 16, "lcm", "lightx2v", 1.0, 0.0, 1.0, 0.0, 0.5, ""]
    return g.to_json()


def main():
    os.makedirs(os.path.join(ROOT, "workflows"), exist_ok=True)
    for name, wf in (("fantasyportrait_single.json", single()), ("fantasyportrait_multi.json", multi()),
                     ("fantasyportrait_native.json", native()), ("fantasyportrait_fast.json", fast())):
        with open(os.path.join(ROOT, "workflows", name), "w") as f:
            json.dump(wf, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print("wrote", name, len(wf["nodes"]), "nodes", len(wf["links"]), "links")


if __name__ == "__main__":
    main()

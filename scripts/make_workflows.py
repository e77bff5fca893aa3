"""Write the example workflows (ComfyUI UI format) in workflows/.

    python scripts/make_workflows.py

Each graph is described once, in a function returning a :class:`Graph` (nodes, widget values, links
by socket name), so ids, slots and link tables stay consistent; the JSON files are what users load.
Widget values of the pack's nodes come from the node classes' own ``INPUT_TYPES`` defaults
(:func:`widgets`), a graph naming only the values it changes; the negative prompt is the core's.

Layout rule (``Graph.layout``, tested in tests/test_workflows.py): every node sits in a column and a
band. Columns follow the data flow, so every link goes from a column to one further right; bands
are horizontal strips (models and prompts, the reference portrait, each driving video), each drawn
as a titled group. Within a cell nodes stack top to bottom. Each node reserves its title bar above
it and ``grow`` pixels below it, the room its preview takes after a run (image and video previews,
the sampler's latent preview, text shown by Preview Any), so nothing overlaps before or after a run.
A new graph only picks ``col``/``band`` (and ``grow`` for a node that shows a preview):

    g = Graph(bands=["Models and prompts", "Driving video"])
    g.add("loader", "FantasyPortraitWanModelLoader", col=0, band=0,
          widgets=widgets("FantasyPortraitWanModelLoader", transformer="wan.safetensors", adapter="fp.safetensors"))
    g.link("loader", "model", "sampler", "model")
    WORKFLOWS["fantasyportrait_x.json"] = my_graph
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fantasyportrait_core.model.encoders import DEFAULT_NEGATIVE_PROMPT  # noqa: E402
from nodes import NODE_CLASS_MAPPINGS  # noqa: E402

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def widgets(type_: str, **values) -> list:
    """``widgets_values`` of one of the pack's nodes, in the order of the node's own ``INPUT_TYPES``
    (required, then optional): each widget at the node's default unless given in ``values`` by input
    name; a seed's ``control_after_generate`` value follows it (``fixed``: example graphs reproduce).

    Raises:
        KeyError: a name in ``values`` that is not a widget of ``type_``.
    """
    spec = NODE_CLASS_MAPPINGS[type_].INPUT_TYPES()
    out, unused = [], dict(values)
    for section in ("required", "optional"):
        for name, (kind, *rest) in spec.get(section, {}).items():
            opts = rest[0] if rest else {}
            if not (isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES) or opts.get("forceInput"):
                continue
            if name in unused:
                out.append(unused.pop(name))
            elif "default" in opts:
                out.append(opts["default"])
            elif isinstance(kind, (list, tuple)):
                out.append(kind[0] if kind else None)  # a file list: the graph names the file
            else:
                out.append({"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind])
            if opts.get("control_after_generate"):
                out.append("fixed")
    if unused:
        raise KeyError(f"{type_} has no widget(s) {sorted(unused)}")
    return out

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
    "PreviewAny": ([("source", "*", False)], []),
    "Note": ([], []),
    "FantasyPortraitWanModelLoader": ([], [("model", "FANTASYPORTRAIT_MODEL")]),
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
                                    [("portrait", "FP_PORTRAIT"), ("preview", "IMAGE"), ("fps", "FLOAT")]),
    "FantasyPortraitSampler": ([("model", "FANTASYPORTRAIT_MODEL", False), ("portrait", "FP_PORTRAIT", False),
                                ("positive", "CONDITIONING", False), ("negative", "CONDITIONING", False),
                                ("latent", "LATENT", False), ("sigmas", "SIGMAS", True)],
                               [("latent", "LATENT"), ("info", "STRING")]),
    "FantasyPortraitLoRA": ([("model", "FANTASYPORTRAIT_MODEL", False)], [("model", "FANTASYPORTRAIT_MODEL")]),
    # directing the performance (fantasyportrait_directed.json)
    "FantasyPortraitDirectExpression": ([("expression", "FP_EXPRESSION", False),
                                         ("expression_encoder", "FP_EXPRESSION_ENCODER", False),
                                         ("faces", "FP_FACES", False)], [("expression", "FP_EXPRESSION"), ("info", "STRING")]),
    "FantasyPortraitSavePerformance": ([("expression", "FP_EXPRESSION", False)],
                                       [("expression", "FP_EXPRESSION"), ("info", "STRING")]),
    "FantasyPortraitLoadPerformance": ([], [("expression", "FP_EXPRESSION"), ("info", "STRING")]),
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
    # Wan2.2 two-expert graph (fantasyportrait_wan22.json)
    "KSamplerAdvanced": ([("model", "MODEL", False), ("positive", "CONDITIONING", False),
                          ("negative", "CONDITIONING", False), ("latent_image", "LATENT", False)], [("LATENT", "LATENT")]),
}
# Widget inputs (name, type, optional) of the node types where a graph links into a widget, in widget
# order: the frontend lists them after the socket inputs, and a link's target slot counts them.
WIDGET_INPUTS = {
    "CreateVideo": [("fps", "FLOAT", False)],
    "FantasyPortraitEncodeExpression": [("people", "INT", False), ("smooth", "FLOAT", False),
                                        ("landmark_filter", "COMBO", True), ("source_fps", "FLOAT", True),
                                        ("fps", "FLOAT", True), ("max_frames", "INT", True),
                                        ("start_frame", "INT", True)],
}

# The reference's default negative prompt (infer.py), from the core.
NEGATIVE = DEFAULT_NEGATIVE_PROMPT
PROMPT = ""  # the reference scripts' prompt (infer_single.sh, infer_multi.sh)

# Layout constants (canvas units = CSS pixels at zoom 1, as LiteGraph draws them; the sizes are the
# ones ComfyUI's frontend 1.27 computes, checked by scripts/screenshot_workflows.mjs).
TITLE_H = 30          # LiteGraph title bar, drawn above a node's pos
SLOT_H = 20           # one input/output row
WIDGET_H = 24         # one widget row (20 + 4 spacing)
NODE_PAD = 14         # below the last row
IMAGE_ROOM = 230      # an image preview (LoadImage, PreviewImage, the sampler's latent preview) adds 212
VIDEO_PAD = 30        # a video preview adds its node-wide picture plus controls
GAP_X = 50            # between columns
GAP_Y = 20            # between a node's reserved area and the next node's title
GROUP_TITLE_H = 40    # room for a group's title above its first nodes
GROUP_PAD = 12        # group border around its nodes
BAND_GAP = 30         # between groups
DEFAULT_W = 320


class Graph:
    """A ComfyUI graph described by columns and bands; :meth:`layout` places it (see module doc).

    Args:
        bands: group titles of the horizontal bands, top to bottom.
    """

    def __init__(self, bands: list[str] | None = None):
        self.nodes, self.links, self.groups = [], [], []
        self.bands = list(bands or [""])

    def add(self, key, type_, col: int, band: int = 0, widgets=(), title=None, size=None, grow: int = 0):
        """Add a node in column ``col`` of band ``band``.

        Args:
            widgets: ``widgets_values`` in the node's widget order.
            size: ``(w, h)`` of the node body (title bar excluded); the height is at least what the
                frontend computes from the sockets and widgets (default width 320).
            grow: room below the node for what it shows after a run (previews), in canvas pixels.
        Raises:
            TypeError: if ``col`` is a position (the old ``pos`` argument).
        """
        if not isinstance(col, int):
            raise TypeError(f"{key}: give a column number (and band), not a position; see the layout rule")
        if not 0 <= band < len(self.bands):
            raise ValueError(f"{key}: band {band} not in {self.bands}")
        ins, outs = SOCKETS[type_]
        w, h = size or (DEFAULT_W, 0)
        size = (w, max(h, max(len(ins), len(outs)) * SLOT_H + len(widgets) * WIDGET_H + NODE_PAD))
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": [0, 0], "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [],
                "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets),
                "_key": key, "_col": col, "_band": band, "_grow": grow}
        if title:
            node["title"] = title
        for name, typ, optional in ins + WIDGET_INPUTS.get(type_, []):
            sock = {"name": name, "type": typ, "link": None}
            if (name, typ, optional) not in ins:
                sock["widget"] = {"name": name}
            if optional:
                sock["shape"] = 7
            node["inputs"].append(sock)
        for i, (name, typ) in enumerate(outs):
            node["outputs"].append({"name": name, "type": typ, "slot_index": i, "links": []})
        self.nodes.append(node)
        return node

    def node(self, key):
        return next(n for n in self.nodes if n["_key"] == key)

    def link(self, src, out_name, dst, in_name):
        a, b = self.node(src), self.node(dst)
        slot_out = next(i for i, o in enumerate(a["outputs"]) if o["name"] == out_name)
        inputs = b["inputs"]
        slot_in = next(i for i, s in enumerate(inputs) if s["name"] == in_name)
        link_id = len(self.links) + 1
        typ = a["outputs"][slot_out]["type"]
        self.links.append([link_id, a["id"], slot_out, b["id"], slot_in, typ])
        a["outputs"][slot_out]["links"].append(link_id)
        inputs[slot_in]["link"] = link_id

    def layout(self):
        """Place every node by the layout rule and make one group per band."""
        cols = sorted({n["_col"] for n in self.nodes})
        width = {c: max(n["size"][0] for n in self.nodes if n["_col"] == c) for c in cols}
        x, left = {}, GROUP_PAD
        for c in cols:
            x[c], left = left, left + width[c] + GAP_X
        self.groups, top = [], 0
        for b, title in enumerate(self.bands):
            members = [n for n in self.nodes if n["_band"] == b]
            if not members:
                continue
            bottom = top
            for c in cols:
                y = top + GROUP_TITLE_H
                for n in (m for m in members if m["_col"] == c):
                    n["pos"] = [x[c], y + TITLE_H]
                    y += TITLE_H + n["size"][1] + n["_grow"] + GAP_Y
                bottom = max(bottom, y - GAP_Y + GROUP_PAD)
            right = max(n["pos"][0] + n["size"][0] for n in members) + GROUP_PAD
            self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [0, top, right, bottom - top],
                                "color": "#3f789e", "font_size": 24, "flags": {}})
            top = bottom + BAND_GAP

    def rects(self) -> dict:
        """``key -> (x, y, w, h)`` of each node's reserved area: title bar, body and ``grow``."""
        return {n["_key"]: (n["pos"][0], n["pos"][1] - TITLE_H, n["size"][0], TITLE_H + n["size"][1] + n["_grow"])
                for n in self.nodes}

    def to_json(self):
        self.layout()
        nodes = []
        for n in self.nodes:
            n = {k: v for k, v in n.items() if not k.startswith("_")}
            n["outputs"] = [dict(o, links=o["links"] or None) for o in n["outputs"]]
            nodes.append(n)
        return {"last_node_id": len(nodes), "last_link_id": len(self.links), "nodes": nodes, "links": self.links,
                "groups": self.groups, "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [40, 40]}},
                "version": 0.4}


def layout_problems(g: Graph) -> list[str]:
    """What breaks the layout rule in ``g`` (after :meth:`Graph.layout`): overlapping reserved
    areas, links that do not go left to right, nodes outside their band's group."""
    g.layout()
    rects, problems = g.rects(), []
    keys = list(rects)
    for i, a in enumerate(keys):
        ax, ay, aw, ah = rects[a]
        for b in keys[i + 1:]:
            bx, by, bw, bh = rects[b]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                problems.append(f"{a} and {b} overlap")
    by_id = {n["id"]: n for n in g.nodes}
    for _, src, _, dst, _, _ in g.links:
        a, b = by_id[src], by_id[dst]
        if a["pos"][0] + a["size"][0] >= b["pos"][0]:
            problems.append(f"link {a['_key']} -> {b['_key']} does not go left to right")
    bands = [gr for gr in g.groups]
    for n in g.nodes:
        x, y, w, h = rects[n["_key"]]
        inside = [gr for gr in bands if gr["bounding"][0] <= x and x + w <= gr["bounding"][0] + gr["bounding"][2]
                  and gr["bounding"][1] <= y and y + h <= gr["bounding"][1] + gr["bounding"][3]]
        if len(inside) != 1 or inside[0]["title"] != g.bands[n["_band"]]:
            problems.append(f"{n['_key']} is not inside its group {g.bands[n['_band']]!r}")
    return problems


def video_room(width: int, height: int, node_w: int) -> int:
    """Room a ``width × height`` video preview takes below a node ``node_w`` wide."""
    return round(node_w * height / width) + VIDEO_PAD


def reference_band(g: Graph, image_name: str, preview_w: int = 340):
    """Band 1 of every graph: the reference portrait, its faces (Face Masks + preview) and Portrait
    Conditioning with its preview of which track drives which face."""
    g.add("image", "LoadImage", 0, 1, [image_name, "image"], title="Reference portrait", size=(360, 0),
          grow=IMAGE_ROOM)
    g.add("facemasks", "FantasyPortraitFaceMasks", 1, 1, size=(340, 0))
    g.add("facepreview", "PreviewImage", 2, 1, title="Faces found (#0 = leftmost)", size=(320, 0), grow=IMAGE_ROOM)
    g.add("cond", "FantasyPortraitConditioning", 3, 1, widgets("FantasyPortraitConditioning"), size=(340, 0))
    g.add("condpreview", "PreviewImage", 4, 1, title="Which video track drives which face", size=(preview_w, 0),
          grow=IMAGE_ROOM)


def link_conditioning(g: Graph, clip_vision: bool = True):
    """The links every graph shares: prompts (and CLIP vision, unless ``clip_vision`` is False: Wan2.2
    I2V has no image branch) into WanImageToVideo, the reference image into CLIP Vision Encode,
    WanImageToVideo and Face Masks, faces into Conditioning, previews."""
    vision = {("clipvision", "CLIP_VISION", "clipenc", "clip_vision"), ("image", "IMAGE", "clipenc", "image"),
              ("clipenc", "CLIP_VISION_OUTPUT", "i2v", "clip_vision_output")}
    for a, o, b, i in [("clip", "CLIP", "pos", "clip"), ("clip", "CLIP", "neg", "clip"),
                       ("clipvision", "CLIP_VISION", "clipenc", "clip_vision"), ("image", "IMAGE", "clipenc", "image"),
                       ("pos", "CONDITIONING", "i2v", "positive"), ("neg", "CONDITIONING", "i2v", "negative"),
                       ("vae", "VAE", "i2v", "vae"), ("clipenc", "CLIP_VISION_OUTPUT", "i2v", "clip_vision_output"),
                       ("image", "IMAGE", "i2v", "start_image"),
                       ("detector", "face_detector", "facemasks", "face_detector"), ("image", "IMAGE", "facemasks", "image"),
                       ("facemasks", "preview", "facepreview", "images"), ("facemasks", "faces", "cond", "faces"),
                       ("cond", "preview", "condpreview", "images")]:
        if clip_vision or (a, o, b, i) not in vision:
            g.link(a, o, b, i)


def video_out(g: Graph, prefix: str):
    """VAE Decode, Create Video and Save Video (``prefix``) in columns 7-9 of the native graphs."""
    g.add("decode", "VAEDecode", 7, 0, size=(200, 0))
    g.add("create", "CreateVideo", 8, 0, [25], size=(230, 0))
    g.add("save", "SaveVideo", 9, 0, [prefix, "auto", "auto"], size=(380, 0), grow=video_room(720, 720, 380))


def common(g: Graph, image_name: str, width: int, height: int, length: int, prompt: str = PROMPT,
           lora: str | None = None):
    """Models, text, CLIP vision, WanImageToVideo, reference faces, sampler, decode and save.

    Columns: 0 loaders and inputs, 1 encoders, 2 WanImageToVideo / face preview / Encode Expression,
    3 Conditioning / expression info, 4 Sampler, 5 VAE Decode, 6 Create Video, 7 Save Video.
    Bands: 0 models and prompts, 1 reference portrait, 2.. driving videos. ``lora``: a FantasyPortrait
    LoRA node (column 1) between the model loader and the sampler, with that file.
    """
    g.add("model", "FantasyPortraitWanModelLoader", 0, 0,
          widgets("FantasyPortraitWanModelLoader", transformer="wan2.1_i2v_720p_14B_bf16.safetensors",
                  adapter="Wan2_1_FantasyPortrait_fp16.safetensors"), size=(360, 0))
    g.add("clip", "CLIPLoader", 0, 0, ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"], size=(360, 0))
    g.add("clipvision", "CLIPVisionLoader", 0, 0, ["clip_vision_h.safetensors"], size=(360, 0))
    g.add("vae", "VAELoader", 0, 0, ["wan_2.1_vae.safetensors"], size=(360, 0))
    g.add("encoder", "FantasyPortraitExpressionEncoderLoader", 0, 0,
          widgets("FantasyPortraitExpressionEncoderLoader", encoder="pd_fpg.pth"), size=(360, 0))
    g.add("detector", "FantasyPortraitFaceDetectorLoader", 0, 0, widgets("FantasyPortraitFaceDetectorLoader"), size=(360, 0))
    g.add("pos", "CLIPTextEncode", 1, 0, [prompt], title="Positive prompt (the reference leaves it empty)",
          size=(340, 140))
    g.add("neg", "CLIPTextEncode", 1, 0, [NEGATIVE], title="Negative prompt (used when cfg > 1)", size=(340, 140))
    g.add("clipenc", "CLIPVisionEncode", 1, 0, ["none"], title="CLIP Vision Encode (crop none = whole image)",
          size=(340, 0))
    g.add("i2v", "WanImageToVideo", 2, 0, [width, height, length, 1], size=(320, 0))
    g.add("note", "Note", 2, 0, [
        f"Size as the reference: the longest side scaled to 720, rounded up to a multiple of 16 ({width}x{height} "
        f"for this image). Wan's 480p size 832x480 (or 480x832) also works and is about twice as fast.\n\n"
        f"length: frames to generate (4k+1), at most the driving clip's frame count at the output fps (Encode "
        f"Expression fps, 25 as the reference). The reference makes up to 201 frames in one pass; the sampler "
        f"does that when it fits in memory (long_video = auto), else overlapping windows."], size=(320, 230))
    g.add("sampler", "FantasyPortraitSampler", 4, 0, widgets("FantasyPortraitSampler"), size=(340, 0), grow=IMAGE_ROOM)
    g.add("decode", "VAEDecode", 5, 0, size=(200, 0))
    g.add("samplerinfo", "PreviewAny", 5, 0, title="What the sampler ran (memory plan, passes)", size=(300, 150))
    g.add("create", "CreateVideo", 6, 0, [25], size=(230, 0))
    g.add("save", "SaveVideo", 7, 0, ["video/FantasyPortrait", "auto", "auto"], size=(380, 0),
          grow=video_room(width, height, 380))

    reference_band(g, image_name)

    link_conditioning(g)
    for a, o, b, i in [("cond", "portrait", "sampler", "portrait"),
                       ("i2v", "positive", "sampler", "positive"), ("i2v", "negative", "sampler", "negative"),
                       ("i2v", "latent", "sampler", "latent"), ("sampler", "latent", "decode", "samples"),
                       ("sampler", "info", "samplerinfo", "source"),
                       ("vae", "VAE", "decode", "vae"), ("decode", "IMAGE", "create", "images"),
                       ("cond", "fps", "create", "fps"), ("create", "VIDEO", "save", "video")]:
        g.link(a, o, b, i)
    if lora:
        g.add("lora", "FantasyPortraitLoRA", 1, 0, widgets("FantasyPortraitLoRA", lora_name=lora),
              title="LoRA: lightx2v step distill", size=(340, 0))
        g.link("model", "model", "lora", "model")
        g.link("lora", "model", "sampler", "model")
    else:
        g.link("model", "model", "sampler", "model")


def driving(g: Graph, key: str, video: str, band: int, people: int = 1, size: tuple[int, int] = (512, 512),
            frames: int = 0):
    """Load Video → Get Video Components → Encode Expression (resampled to 25 fps) → its info shown.
    ``frames`` (= WanImageToVideo length) caps what is encoded (Encode Expression max_frames)."""
    g.add(f"{key}_video", "LoadVideo", 0, band, [video, "image"], title=f"Driving video {key}", size=(300, 0),
          grow=video_room(*size, 300))
    g.add(f"{key}_parts", "GetVideoComponents", 1, band, size=(240, 0))
    g.add(f"{key}_expr", "FantasyPortraitEncodeExpression", 2, band,
          widgets("FantasyPortraitEncodeExpression", people=people, max_frames=frames),
          size=(320, 0))
    g.add(f"{key}_info", "PreviewAny", 3, band, title=f"Driving video {key}: what was found",
          size=(340, 130))
    g.link(f"{key}_video", "VIDEO", f"{key}_parts", "video")
    g.link(f"{key}_parts", "images", f"{key}_expr", "images")
    g.link(f"{key}_parts", "fps", f"{key}_expr", "source_fps")
    g.link("encoder", "expression_encoder", f"{key}_expr", "expression_encoder")
    g.link("detector", "face_detector", f"{key}_expr", "face_detector")
    g.link(f"{key}_expr", "info", f"{key}_info", "source")


def single() -> Graph:
    g = Graph(["Models and prompts", "Reference portrait", "Driving video A"])
    common(g, "man.jpeg", 720, 720, 97)  # jgz.mp4: 59 frames at 15 fps = 98 at 25 fps
    driving(g, "A", "jgz.mp4", 2, frames=97)
    g.link("A_expr", "expression", "cond", "expression")
    g.link("A_parts", "audio", "create", "audio")  # the driving video's sound goes to the output
    return g


def multi() -> Graph:
    g = Graph(["Models and prompts", "Reference portrait", "Driving video A (leftmost face)",
               "Driving video B (next face to the right)"])
    common(g, "two_person.png", 720, 416, 201)  # 1084x610 -> 720x405 -> /16 up
    driving(g, "A", "biden.mp4", 2, size=(432, 432), frames=201)  # character 0 = face #0 (leftmost)
    driving(g, "B", "trump.mp4", 3, size=(416, 416), frames=201)  # character 1 = face #1
    g.link("A_expr", "expression", "cond", "expression")
    g.link("B_expr", "expression", "cond", "expression_2")
    g.link("A_parts", "audio", "create", "audio")  # first driver's sound (these two clips have none)
    return g


LIGHTX2V_LORA = "Wan21_I2V_14B_lightx2v_cfg_step_distill_lora_rank64_bf16.safetensors"


def fast() -> Graph:
    """The single-character graph in few-step mode: lightx2v step-distill LoRA (FantasyPortrait LoRA
    node between the model loader and the sampler), the sampler's lightx2v preset (4 steps, cfg 1),
    portrait guidance on the first half of the steps only (2 + 2 + 1 + 1 transformer passes)."""
    g = Graph(["Models and prompts", "Reference portrait", "Driving video A"])
    common(g, "man.jpeg", 720, 720, 97, lora=LIGHTX2V_LORA)
    driving(g, "A", "jgz.mp4", 2, frames=97)
    g.link("A_expr", "expression", "cond", "expression")
    g.link("A_parts", "audio", "create", "audio")
    sampler = g.node("sampler")
    sampler["title"] = "Sampler: lightx2v, 4 steps, cfg 1"
    sampler["widgets_values"] = widgets("FantasyPortraitSampler", steps=4, sampler="lcm", preset="lightx2v",
                                        portrait_cfg_end=0.5)
    return g


def native() -> Graph:
    """One character on ComfyUI's own Wan2.1 I2V MODEL: Load Diffusion Model (bf16 / fp8; a GGUF loader
    fits the same socket), an optional LoraLoaderModelOnly (bypassed; e.g. the lightx2v step-distill
    LoRA, then steps 4-8, cfg 1), FantasyPortrait Patch Model + Guider, SamplerCustomAdvanced.

    Columns: 0 loaders and inputs, 1 LoRA / encoders, 2 shift / WanImageToVideo / face preview /
    Encode Expression, 3 Conditioning, 4 Patch Model, 5 Guider / noise / sampler / sigmas,
    6 SamplerCustomAdvanced, 7 VAE Decode, 8 Create Video, 9 Save Video.
    """
    g = Graph(["Models and prompts", "Reference portrait", "Driving video A"])
    g.add("unet", "UNETLoader", 0, 0, ["wan2.1_i2v_720p_14B_fp8_e4m3fn.safetensors", "default"], size=(360, 0))
    g.add("clip", "CLIPLoader", 0, 0, ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"], size=(360, 0))
    g.add("clipvision", "CLIPVisionLoader", 0, 0, ["clip_vision_h.safetensors"], size=(360, 0))
    g.add("vae", "VAELoader", 0, 0, ["wan_2.1_vae.safetensors"], size=(360, 0))
    g.add("adapter", "FantasyPortraitAdapterLoader", 0, 0,
          widgets("FantasyPortraitAdapterLoader", adapter="Wan2_1_FantasyPortrait_fp16.safetensors"),
          size=(360, 0))
    g.add("encoder", "FantasyPortraitExpressionEncoderLoader", 0, 0,
          widgets("FantasyPortraitExpressionEncoderLoader", encoder="pd_fpg.pth"), size=(360, 0))
    g.add("detector", "FantasyPortraitFaceDetectorLoader", 0, 0, widgets("FantasyPortraitFaceDetectorLoader"), size=(360, 0))
    lora = g.add("lora", "LoraLoaderModelOnly", 1, 0,
                 ["lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors", 1.0],
                 title="LoRA (optional: Ctrl+B to enable)", size=(340, 0))
    lora["mode"] = 4  # bypassed: the MODEL passes through unchanged
    g.add("pos", "CLIPTextEncode", 1, 0, [PROMPT], title="Positive prompt (the reference leaves it empty)",
          size=(340, 140))
    g.add("neg", "CLIPTextEncode", 1, 0, [NEGATIVE], title="Negative prompt (used when cfg > 1)", size=(340, 140))
    g.add("clipenc", "CLIPVisionEncode", 1, 0, ["none"], title="CLIP Vision Encode (crop none = whole image)",
          size=(340, 0))
    g.add("shift", "ModelSamplingSD3", 2, 0, [5.0], title="Shift 5 (reference)", size=(320, 0))
    g.add("i2v", "WanImageToVideo", 2, 0, [720, 720, 97, 1], size=(320, 0))
    g.add("patch", "FantasyPortraitPatchModel", 4, 0, size=(320, 0))
    g.add("guider", "FantasyPortraitGuider", 5, 0, widgets("FantasyPortraitGuider"), size=(320, 0))
    g.add("noise", "RandomNoise", 5, 0, [42, "fixed"], size=(320, 0))
    g.add("ksampler", "KSamplerSelect", 5, 0, ["euler"], size=(320, 0))
    g.add("sigmas", "BasicScheduler", 5, 0, ["simple", 30, 1.0], size=(320, 0))
    g.add("sample", "SamplerCustomAdvanced", 6, 0, size=(320, 0), grow=IMAGE_ROOM)
    video_out(g, "video/FantasyPortrait_native")

    reference_band(g, "man.jpeg", preview_w=320)
    driving(g, "A", "jgz.mp4", 2, frames=97)
    for a, o, b, i in [("unet", "MODEL", "lora", "model"), ("lora", "MODEL", "shift", "model"),
                       ("shift", "MODEL", "patch", "model"), ("adapter", "adapter", "patch", "adapter"),
                       ("cond", "portrait", "patch", "portrait"), ("patch", "model", "guider", "model"),
                       ("patch", "model", "sigmas", "model")]:
        g.link(a, o, b, i)
    link_conditioning(g)
    for a, o, b, i in [("A_expr", "expression", "cond", "expression"),
                       ("i2v", "positive", "guider", "positive"), ("i2v", "negative", "guider", "negative"),
                       ("noise", "NOISE", "sample", "noise"), ("guider", "guider", "sample", "guider"),
                       ("ksampler", "SAMPLER", "sample", "sampler"), ("sigmas", "SIGMAS", "sample", "sigmas"),
                       ("i2v", "latent", "sample", "latent_image"), ("sample", "output", "decode", "samples"),
                       ("vae", "VAE", "decode", "vae"), ("decode", "IMAGE", "create", "images"),
                       ("A_parts", "audio", "create", "audio"), ("cond", "fps", "create", "fps"),
                       ("create", "VIDEO", "save", "video")]:
        g.link(a, o, b, i)
    return g


def flash() -> Graph:
    """Two characters with FlashPortrait (Francis-Rings/FlashPortrait): its whole fine-tuned DiT
    (transformer.pt) and portrait encoder in our Model Loader, the same masks and assignment as the
    multi graph (FlashPortrait itself animates one person), its window preset for long videos
    (51 latent frames, overlap 30) and its defaults (30 steps, cfg 1, portrait cfg 4, shift 5)."""
    g = Graph(["Models and prompts", "Reference portrait", "Driving video A (leftmost face)",
               "Driving video B (next face to the right)"])
    common(g, "two_person.png", 720, 416, 201)
    model = g.node("model")
    model["title"] = "FlashPortrait: transformer.pt + portrait_encoder.pt"
    model["widgets_values"] = widgets("FantasyPortraitWanModelLoader", transformer="FlashPortrait/transformer.pt",
                                      adapter="FlashPortrait/portrait_encoder.pt")
    sampler = g.node("sampler")
    sampler["title"] = "Sampler: FlashPortrait windows (51/30 latent frames)"
    sampler["widgets_values"] = widgets("FantasyPortraitSampler", long_video="flashportrait")
    driving(g, "A", "biden.mp4", 2, size=(432, 432), frames=201)
    driving(g, "B", "trump.mp4", 3, size=(416, 416), frames=201)
    g.link("A_expr", "expression", "cond", "expression")
    g.link("B_expr", "expression", "cond", "expression_2")
    g.link("A_parts", "audio", "create", "audio")
    return g


WAN22_HIGH = "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"
WAN22_LOW = "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"


def wan22() -> Graph:
    """EXPERIMENTAL: one character on Wan2.2-I2V-A14B's two experts as ComfyUI's own example graph runs
    them (two Load Diffusion Model, shift 8 each, two KSamplerAdvanced: 20 steps, cfg 3.5, the high-noise
    expert on steps 0-10 returning its leftover noise, the low-noise one on 10-20), with FantasyPortrait
    Patch Model on each expert MODEL (same adapter, same portrait). Wan2.2 I2V has no CLIP vision input.
    KSamplerAdvanced's guidance is plain cfg (portrait on in every pass; no portrait cfg). The adapter was
    trained on Wan2.1: its quality on Wan2.2 has not been measured.

    Columns: 0 loaders and inputs, 1 encoders / shifts, 2 WanImageToVideo / face preview / Encode
    Expression, 3 Conditioning, 4 Patch Models, 5 high-noise sampler, 6 low-noise sampler, 7 VAE Decode,
    8 Create Video, 9 Save Video.
    """
    g = Graph(["Models and prompts (Wan2.2-I2V-A14B, experimental)", "Reference portrait", "Driving video A"])
    g.add("unet_high", "UNETLoader", 0, 0, [WAN22_HIGH, "default"], title="Wan2.2 I2V high-noise expert",
          size=(360, 0))
    g.add("unet_low", "UNETLoader", 0, 0, [WAN22_LOW, "default"], title="Wan2.2 I2V low-noise expert", size=(360, 0))
    g.add("clip", "CLIPLoader", 0, 0, ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"], size=(360, 0))
    g.add("vae", "VAELoader", 0, 0, ["wan_2.1_vae.safetensors"], size=(360, 0))
    g.add("adapter", "FantasyPortraitAdapterLoader", 0, 0,
          widgets("FantasyPortraitAdapterLoader", adapter="Wan2_1_FantasyPortrait_fp16.safetensors"),
          size=(360, 0))
    g.add("encoder", "FantasyPortraitExpressionEncoderLoader", 0, 0,
          widgets("FantasyPortraitExpressionEncoderLoader", encoder="pd_fpg.pth"), size=(360, 0))
    g.add("detector", "FantasyPortraitFaceDetectorLoader", 0, 0, widgets("FantasyPortraitFaceDetectorLoader"), size=(360, 0))
    g.add("pos", "CLIPTextEncode", 1, 0, [PROMPT], title="Positive prompt", size=(340, 140))
    g.add("neg", "CLIPTextEncode", 1, 0, [NEGATIVE], title="Negative prompt (cfg 3.5)", size=(340, 140))
    g.add("shift_high", "ModelSamplingSD3", 1, 0, [8.0], title="Shift 8 (high-noise expert)", size=(340, 0))
    g.add("shift_low", "ModelSamplingSD3", 1, 0, [8.0], title="Shift 8 (low-noise expert)", size=(340, 0))
    g.add("i2v", "WanImageToVideo", 2, 0, [720, 720, 97, 1], size=(320, 0))
    g.add("note", "Note", 2, 0, [
        "EXPERIMENTAL: FantasyPortrait's adapter was trained on Wan2.1; nobody has measured its quality on Wan2.2.\n\n"
        "Each expert MODEL gets its own FantasyPortrait Patch Model (bypass one with Ctrl+B to keep the portrait "
        "on the other expert only). Steps 0-10 of 20 run on the high-noise expert, 10-20 on the low-noise one, "
        "as ComfyUI's Wan2.2 example."], size=(320, 230))
    g.add("patch_high", "FantasyPortraitPatchModel", 4, 0, title="Patch Model (high-noise expert)", size=(320, 0))
    g.add("patch_low", "FantasyPortraitPatchModel", 4, 0, title="Patch Model (low-noise expert)", size=(320, 0))
    g.add("sample_high", "KSamplerAdvanced", 5, 0,
          ["enable", 42, "fixed", 20, 3.5, "euler", "simple", 0, 10, "enable"], title="High-noise expert: steps 0-10",
          size=(320, 0), grow=IMAGE_ROOM)
    g.add("sample_low", "KSamplerAdvanced", 6, 0,
          ["disable", 42, "fixed", 20, 3.5, "euler", "simple", 10, 10000, "disable"],
          title="Low-noise expert: steps 10-20", size=(320, 0), grow=IMAGE_ROOM)
    video_out(g, "video/FantasyPortrait_wan22")

    reference_band(g, "man.jpeg", preview_w=320)
    driving(g, "A", "jgz.mp4", 2, frames=97)
    for a, o, b, i in [("unet_high", "MODEL", "shift_high", "model"), ("unet_low", "MODEL", "shift_low", "model"),
                       ("shift_high", "MODEL", "patch_high", "model"), ("shift_low", "MODEL", "patch_low", "model"),
                       ("adapter", "adapter", "patch_high", "adapter"), ("adapter", "adapter", "patch_low", "adapter"),
                       ("cond", "portrait", "patch_high", "portrait"), ("cond", "portrait", "patch_low", "portrait"),
                       ("patch_high", "model", "sample_high", "model"), ("patch_low", "model", "sample_low", "model")]:
        g.link(a, o, b, i)
    link_conditioning(g, clip_vision=False)
    for a, o, b, i in [("A_expr", "expression", "cond", "expression"),
                       ("i2v", "positive", "sample_high", "positive"), ("i2v", "negative", "sample_high", "negative"),
                       ("i2v", "latent", "sample_high", "latent_image"),
                       ("i2v", "positive", "sample_low", "positive"), ("i2v", "negative", "sample_low", "negative"),
                       ("sample_high", "LATENT", "sample_low", "latent_image"),
                       ("sample_low", "LATENT", "decode", "samples"), ("vae", "VAE", "decode", "vae"),
                       ("decode", "IMAGE", "create", "images"), ("A_parts", "audio", "create", "audio"),
                       ("cond", "fps", "create", "fps"), ("create", "VIDEO", "save", "video")]:
        g.link(a, o, b, i)
    return g


MOUTH_KEYS = "0:1, 40:0.3, 80:1"  # the directed graph's mouth curve: full, down to 0.3 at frame 40, back at 80
SAVED_PERFORMANCE = "jgz_performance.safetensors"  # in ComfyUI's input folder (Save Performance makes one)


def directed() -> Graph:
    """Directing the performance on the single-character graph: a saved performance (Load Performance,
    no video needed) directed with Direct Expression — head pose held at the portrait's own (strength 0:
    the expression without the head motion) and a mouth keyframe curve — into Conditioning; the driving
    video band records a performance (Encode Expression → Save Performance) to reuse the same way."""
    g = Graph(["Models and prompts", "Reference portrait", "Record a performance (driving video → file)",
               "Directed performance (saved file → strengths → Conditioning)"])
    common(g, "man.jpeg", 720, 720, 97)
    driving(g, "A", "jgz.mp4", 2, frames=97)
    g.add("savep", "FantasyPortraitSavePerformance", 3, 2,
          widgets("FantasyPortraitSavePerformance", filename_prefix="fantasyportrait_performances/jgz"), size=(340, 0))
    g.add("saveinfo", "PreviewAny", 4, 2, title="Saved performance file", size=(340, 110))
    g.add("loadp", "FantasyPortraitLoadPerformance", 0, 3,
          widgets("FantasyPortraitLoadPerformance", performance=SAVED_PERFORMANCE),
          title="Load Performance (saved .safetensors)", size=(360, 0))
    g.add("loadinfo", "PreviewAny", 1, 3, title="Performance loaded", size=(340, 130))
    g.add("direct", "FantasyPortraitDirectExpression", 2, 3,
          widgets("FantasyPortraitDirectExpression", head_pose=0.0, mouth_keys=MOUTH_KEYS),
          title="Direct: no head motion, mouth curve", size=(320, 0))
    g.add("directinfo", "PreviewAny", 3, 3, title="Direction per character", size=(340, 110))
    for a, o, b, i in [("A_expr", "expression", "savep", "expression"), ("savep", "info", "saveinfo", "source"),
                       ("loadp", "info", "loadinfo", "source"), ("loadp", "expression", "direct", "expression"),
                       ("encoder", "expression_encoder", "direct", "expression_encoder"),
                       ("facemasks", "faces", "direct", "faces"), ("direct", "info", "directinfo", "source"),
                       ("direct", "expression", "cond", "expression")]:
        g.link(a, o, b, i)
    return g


WORKFLOWS = {"fantasyportrait_single.json": single, "fantasyportrait_multi.json": multi,
             "fantasyportrait_fast.json": fast, "fantasyportrait_native.json": native}
WORKFLOWS["fantasyportrait_directed.json"] = directed
WORKFLOWS["fantasyportrait_flash.json"] = flash
WORKFLOWS["fantasyportrait_wan22.json"] = wan22


def main():
    os.makedirs(os.path.join(ROOT, "workflows"), exist_ok=True)
    for name, build in WORKFLOWS.items():
        g = build()
        problems = layout_problems(g)
        if problems:
            raise SystemExit(f"{name}: layout rule broken: {problems}")
        wf = g.to_json()
        with open(os.path.join(ROOT, "workflows", name), "w") as f:
            json.dump(wf, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print("wrote", name, len(wf["nodes"]), "nodes", len(wf["links"]), "links")


if __name__ == "__main__":
    main()

"""Every node run through its ComfyUI entry point (INPUT_TYPES / FUNCTION) with ComfyUI-shaped
inputs: IMAGE [B,H,W,3] float 0..1, MASK [B,H,W], CONDITIONING [[tensor, dict]], LATENT {"samples"}."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import nodes
from fantasyportrait_core.media.video import read_image, read_video

from . import checkpoint_writers as W
from .conftest import ROOT, data_path

MAPPINGS = nodes.NODE_CLASS_MAPPINGS


def run(node_type, **inputs):
    """Call a node the way ComfyUI does: validate names against INPUT_TYPES, then FUNCTION."""
    cls = MAPPINGS[node_type]
    spec = cls.INPUT_TYPES()
    required, optional = spec.get("required", {}), spec.get("optional", {})
    missing = [k for k in required if k not in inputs]
    unknown = [k for k in inputs if k not in required and k not in optional]
    assert not missing and not unknown, (missing, unknown)
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    assert isinstance(out, tuple) and len(out) == len(cls.RETURN_TYPES)
    return out


def as_image(frames: np.ndarray) -> torch.Tensor:
    frames = frames[None] if frames.ndim == 3 else frames
    return torch.from_numpy(frames).float() / 255.0


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny):
    transformer, adapter, _, encoder = tiny
    d = tmp_path_factory.mktemp("models")
    return {
        "transformer": W.write_wan_original(transformer, str(d / "wan_i2v.safetensors")),
        "adapter": W.write_adapter_repacked(adapter, str(d / "fantasyportrait.safetensors"), encoder),
    }


@pytest.fixture(scope="module")
def loaded(files):
    (model,) = run("FantasyPortraitWanModelLoader", transformer=files["transformer"], adapter=files["adapter"],
                   weight_dtype="bf16", storage="fp8_e4m3fn", offload="none")
    (encoder,) = run("FantasyPortraitExpressionEncoderLoader", encoder=files["adapter"])
    (detector,) = run("FantasyPortraitFaceDetectorLoader", backend="mtcnn (offline)", min_score=0.0)
    return model, encoder, detector


def test_loaders(loaded):
    model, encoder, detector = loaded
    assert len(model.transformer.blocks) == model.adapter.num_layers == 2
    assert not encoder.training
    assert detector.name == "mtcnn"


def test_missing_model_file_names_folder():
    with pytest.raises(FileNotFoundError, match="fantasyportrait"):
        run("FantasyPortraitExpressionEncoderLoader", encoder="pd_fpg.pth")


def _conditioning(model, frames_lat, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.transformer.config
    mask = torch.ones(1, 1, frames_lat, h, w)
    mask[:, :, 0] = 0.0  # WanImageToVideo: 0 = given start frame
    extra = {"pooled_output": None, "concat_latent_image": torch.randn(1, 16, frames_lat, h, w, generator=g),
             "concat_mask": mask,
             "clip_vision_output": SimpleNamespace(penultimate_hidden_states=torch.randn(1, 257, c.image_dim, generator=g))}
    pos = [[torch.randn(1, 512, c.text_dim, generator=g), dict(extra)]]
    neg = [[torch.randn(1, 512, c.text_dim, generator=g), dict(extra)]]
    return pos, neg


def test_two_character_graph(loaded):
    model, encoder, detector = loaded
    biden = read_video(data_path("biden.mp4"), max_frames=9).frames
    trump = read_video(data_path("trump.mp4"), max_frames=9).frames
    ref = read_image(data_path("two_person.png"))

    expr_a, crops, info = run("FantasyPortraitEncodeExpression", expression_encoder=encoder, face_detector=detector,
                              images=as_image(biden), people=1, smooth=0.0)
    expr_b, _, _ = run("FantasyPortraitEncodeExpression", expression_encoder=encoder, face_detector=detector,
                       images=as_image(trump), people=1, smooth=0.0)
    assert crops.shape == (9, 224, 224, 3) and 0 <= crops.min() and crops.max() <= 1
    assert info.splitlines()[0] == "detector: mtcnn"  # the backend that ran
    assert info.splitlines()[1].startswith("driver #0: 9 frames at 25 fps")

    faces, masks, preview = run("FantasyPortraitFaceMasks", face_detector=detector, image=as_image(ref))
    assert len(faces.faces) == 2 and masks.shape == (2, ref.shape[0], ref.shape[1])
    assert preview.ndim == 4 and preview.shape[-1] == 3
    # face 0 is the left one: its mask's centre of mass is left of face 1's
    xs = torch.arange(ref.shape[1]).float()
    cx = [(m.sum(0) * xs).sum() / m.sum() for m in masks]
    assert cx[0] < cx[1]

    portrait, cpreview, fps = run("FantasyPortraitConditioning", faces=faces, expression=expr_a, expression_2=expr_b,
                             portrait_scale=1.0, assignment="left_to_right", face_order="")
    assert len(portrait.drivers) == 2 and cpreview.shape[-1] == 3

    h, w, f_lat = 12, 20, 3  # 160x96 pixels, 9 frames
    pos, neg = _conditioning(model, f_lat, h, w)
    latent = {"samples": torch.zeros(1, 16, f_lat, h, w)}
    kw = dict(model=model, portrait=portrait, positive=pos, negative=neg, latent=latent, seed=7, steps=2,
              cfg=2.0, portrait_cfg=3.0, shift=5.0, context_frames=81, context_overlap=16)
    out, info = run("FantasyPortraitSampler", **kw)
    assert out["samples"].shape == latent["samples"].shape and torch.isfinite(out["samples"]).all()
    assert "memory plan: fp8 weights, offload none, 3 of 3 guidance pass(es) per forward" in info, info
    again, _ = run("FantasyPortraitSampler", **kw)
    assert torch.equal(out["samples"], again["samples"]), "same seed, same result"
    assert model.state.condition is None

    # swapping which face each expression drives changes the result
    swapped, _, _ = run("FantasyPortraitConditioning", faces=faces, expression=expr_a, expression_2=expr_b,
                     portrait_scale=1.0, assignment="left_to_right", face_order="1,0")
    other, _ = run("FantasyPortraitSampler", **{**kw, "portrait": swapped})
    assert not torch.equal(out["samples"], other["samples"])


def test_sampler_errors_name_what_to_connect(loaded):
    model, encoder, detector = loaded
    frames = read_video(data_path("jgz.mp4"), max_frames=5).frames
    expr, _, _ = run("FantasyPortraitEncodeExpression", expression_encoder=encoder, face_detector=detector,
                     images=as_image(frames), people=1, smooth=0.0)
    faces, _, _ = run("FantasyPortraitFaceMasks", face_detector=detector, image=as_image(read_image(data_path("man.jpeg"))))
    portrait, _, _ = run("FantasyPortraitConditioning", faces=faces, expression=expr, portrait_scale=1.0, assignment="left_to_right", face_order="")
    pos, neg = _conditioning(model, 2, 8, 8)
    base = dict(model=model, portrait=portrait, negative=neg, seed=1, steps=1, cfg=1.0, portrait_cfg=4.0, shift=5.0, context_frames=81, context_overlap=16)
    with pytest.raises(ValueError, match="WanImageToVideo"):
        run("FantasyPortraitSampler", positive=[[pos[0][0], {}]], latent={"samples": torch.zeros(1, 16, 2, 8, 8)}, **base)
    with pytest.raises(ValueError, match="length to at most 5"):
        run("FantasyPortraitSampler", positive=pos, latent={"samples": torch.zeros(1, 16, 3, 8, 8)}, **base)
    no_clip = [[pos[0][0], {k: v for k, v in pos[0][1].items() if k != "clip_vision_output"}]]
    with pytest.raises(ValueError, match="CLIPVisionEncode"):
        run("FantasyPortraitSampler", positive=no_clip, latent={"samples": torch.zeros(1, 16, 2, 8, 8)}, **base)
    with pytest.raises(ValueError, match="face_order"):
        run("FantasyPortraitConditioning", faces=faces, expression=expr, portrait_scale=1.0, assignment="left_to_right", face_order="a")
    with pytest.raises(ValueError, match="2 driving expression"):
        run("FantasyPortraitConditioning", faces=faces, expression=expr, expression_2=expr, portrait_scale=1.0, assignment="left_to_right",
            face_order="")


# Native ComfyUI node types the example workflows use (checked against a real ComfyUI by
# scripts/check_in_comfyui.py).
NATIVE = {"CLIPLoader", "CLIPTextEncode", "CLIPVisionLoader", "CLIPVisionEncode", "LoadImage", "VAELoader",
          "WanImageToVideo", "VAEDecode", "LoadVideo", "GetVideoComponents", "CreateVideo", "SaveVideo", "PreviewImage",
          "PreviewAny",
          "Note"}


def _widget_count(spec: dict) -> int:
    n = 0
    for group in ("required", "optional"):
        for name, entry in spec.get(group, {}).items():
            typ = entry[0]
            if isinstance(typ, list) or typ in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                n += 1 + (1 if len(entry) > 1 and entry[1].get("control_after_generate") else 0)
    return n


@pytest.mark.parametrize("name", ["fantasyportrait_single.json", "fantasyportrait_multi.json"])
def test_workflow_node_types_exist(name):
    with open(os.path.join(ROOT, "workflows", name)) as f:
        wf = json.load(f)
    types = {n["type"] for n in wf["nodes"]}
    ours = {t for t in types if t.startswith("FantasyPortrait")}
    assert ours and ours <= set(MAPPINGS), ours - set(MAPPINGS)
    assert types - ours <= NATIVE, types - ours - NATIVE
    ids = {n["id"] for n in wf["nodes"]}
    for link in wf["links"]:
        assert link[1] in ids and link[3] in ids
    for n in wf["nodes"]:
        if n["type"] in MAPPINGS:
            assert len(n.get("widgets_values", [])) == _widget_count(MAPPINGS[n["type"]].INPUT_TYPES()), n["type"]
            for inp in n.get("inputs", []):
                spec = MAPPINGS[n["type"]].INPUT_TYPES()
                assert inp["name"] in spec["required"] or inp["name"] in spec.get("optional", {}), inp["name"]


def test_interrupt_mid_sampling_then_next_run_succeeds(loaded, monkeypatch):
    """Cancel during sampling (ComfyUI raises from its interrupt check) leaves the model usable."""
    import nodes.host as host

    model, encoder, detector = loaded
    frames = read_video(data_path("jgz.mp4"), max_frames=5).frames
    expr, _, _ = run("FantasyPortraitEncodeExpression", expression_encoder=encoder, face_detector=detector,
                     images=as_image(frames), people=1, smooth=0.0)
    faces, _, _ = run("FantasyPortraitFaceMasks", face_detector=detector, image=as_image(read_image(data_path("man.jpeg"))))
    portrait, _, _ = run("FantasyPortraitConditioning", faces=faces, expression=expr, portrait_scale=1.0,
                      assignment="left_to_right", face_order="")
    pos, neg = _conditioning(model, 2, 8, 8)
    kw = dict(model=model, portrait=portrait, positive=pos, negative=neg, latent={"samples": torch.zeros(1, 16, 2, 8, 8)},
              seed=3, steps=4, cfg=1.0, portrait_cfg=4.0, shift=5.0, context_frames=81, context_overlap=16)
    reference, _ = run("FantasyPortraitSampler", **kw)

    class Interrupted(Exception):
        pass

    calls = []

    def cancel_at_step_2():
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted

    monkeypatch.setattr(host, "check_interrupt", cancel_at_step_2)
    with pytest.raises(Interrupted):
        run("FantasyPortraitSampler", **kw)
    assert model.state.condition is None
    assert next(model.transformer.parameters()).device.type == "cpu"
    monkeypatch.setattr(host, "check_interrupt", lambda: None)
    after, _ = run("FantasyPortraitSampler", **kw)
    assert torch.equal(after["samples"], reference["samples"]), "a cancelled run must not change later results"


def test_expression_cache_across_prompts(loaded, monkeypatch):
    model, encoder, detector = loaded
    frames = read_video(data_path("jgz.mp4"), max_frames=15).frames[8:13]  # not encoded by other tests
    calls = []
    from fantasyportrait_core.drive import encode as drive_encode

    real = drive_encode.encode_driving
    monkeypatch.setattr(drive_encode, "encode_driving", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = run("FantasyPortraitEncodeExpression", expression_encoder=encoder, face_detector=detector,
                images=as_image(frames), people=1, smooth=0.0)[0]
    again = run("FantasyPortraitEncodeExpression", expression_encoder=encoder, face_detector=detector,
                images=as_image(frames.copy()), people=1, smooth=0.0)[0]
    assert len(calls) == 1 and again is first
    run("FantasyPortraitEncodeExpression", expression_encoder=encoder, face_detector=detector,
        images=as_image(frames[:3]), people=1, smooth=0.0)
    assert len(calls) == 2, "other frames are encoded"


def test_expression_cache_never_serves_a_freed_encoders_features(loaded, monkeypatch):
    """A reloaded encoder gets its own features even when Python hands it the freed one's address.

    CPython reuses the id() of a freed object; here every object gets the same id(), the worst case
    of that reuse, so a cache keyed on id() would serve the first encoder's features to the second.
    """
    import copy
    import gc

    from fantasyportrait_core.drive import encode as drive_encode
    import nodes.portrait as portrait

    _, encoder, detector = loaded
    frames = read_video(data_path("jgz.mp4"), max_frames=20).frames[14:17]  # not encoded by other tests
    calls = []
    real = drive_encode.encode_driving
    monkeypatch.setattr(drive_encode, "encode_driving", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(portrait, "id", lambda obj: 1, raising=False)

    first_encoder = copy.deepcopy(encoder)
    first = run("FantasyPortraitEncodeExpression", expression_encoder=first_encoder, face_detector=detector,
                images=as_image(frames), people=1, smooth=0.0)[0]
    cached = len(portrait._EXPRESSION_CACHE)
    del first_encoder
    gc.collect()
    assert len(portrait._EXPRESSION_CACHE) == cached - 1, "a freed encoder's entries are dropped"

    second_encoder = copy.deepcopy(encoder)
    with torch.no_grad():
        for p in second_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    second = run("FantasyPortraitEncodeExpression", expression_encoder=second_encoder, face_detector=detector,
                 images=as_image(frames), people=1, smooth=0.0)[0]
    assert len(calls) == 2, "the reloaded encoder must encode the frames itself"
    assert not torch.equal(torch.as_tensor(second[0].features), torch.as_tensor(first[0].features))


def test_every_input_has_a_tooltip():
    for name, cls in MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for inp, entry in spec.get(group, {}).items():
                assert len(entry) > 1 and entry[1].get("tooltip"), f"{name}.{inp} has no tooltip"


def test_every_node_has_a_description_and_every_output_a_tooltip():
    for name, cls in MAPPINGS.items():
        assert len(getattr(cls, "DESCRIPTION", "")) > 30, f"{name} has no DESCRIPTION"
        tips = getattr(cls, "OUTPUT_TOOLTIPS", ())
        assert len(tips) == len(cls.RETURN_TYPES) and all(len(t) > 10 for t in tips), f"{name}: OUTPUT_TOOLTIPS"


def test_face_mapping_follows_wanimagetovideo_centre_crop():
    """Faces found on the reference land where WanImageToVideo's centre crop + resize puts them."""
    import nodes.sampler as S
    from fantasyportrait_core.faces.face import Face

    face = Face(np.array([300.0, 100.0, 400.0, 200.0]), np.zeros((5, 2)), 1.0)
    # 1000x500 reference into a square 256x256 video: 250 px cropped each side, then x0.512
    scale, ox, oy = S.center_crop_map(1000, 500, 256, 256)
    assert (ox, oy) == (250.0, 0.0) and scale == pytest.approx(0.512)
    mapped = S.map_face(face, scale, ox, oy).box
    np.testing.assert_allclose(mapped, [25.6, 51.2, 76.8, 102.4])
    # a tall reference into a wide video crops top and bottom
    scale, ox, oy = S.center_crop_map(500, 1000, 320, 160)
    assert ox == 0.0 and oy == pytest.approx(375.0) and scale == pytest.approx(0.64)
    mask = torch.zeros(1000, 500)
    mask[375:625, :] = 1.0  # exactly the kept band
    out = S.map_mask(mask, scale, ox, oy, 320, 160)
    assert out.shape == (1, 160, 320) and out.min() == 1.0


@pytest.mark.parametrize("ram_gib, pin_on_the_fly", [(1024, False), (0, True), (None, True)])
def test_block_offload_pins_on_the_fly_when_ram_is_short(tiny, monkeypatch, ram_gib, pin_on_the_fly):
    """offload = block streams one block at a time with CUDA streams; the pinned host copy of all
    weights is only made when they take under half of the available RAM."""
    import copy

    from nodes import host, loaders

    transformer, adapter = copy.deepcopy(tiny[0]), copy.deepcopy(tiny[1])
    calls = []
    monkeypatch.setattr(host, "torch_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(host, "available_ram_bytes", lambda: None if ram_gib is None else int(ram_gib * 2**30))
    monkeypatch.setattr(transformer, "enable_group_offload", lambda *a, **kw: calls.append((a, kw)), raising=False)
    monkeypatch.setattr(adapter, "to", lambda *a, **kw: adapter)
    model = loaders.build_portrait_model(transformer, adapter, torch.bfloat16, offload="block")
    assert model.offload == "block" and len(calls) == 1
    (device,), kw = calls[0]
    assert device.type == "cuda" and kw["offload_type"] == "block_level" and kw["use_stream"]
    assert kw["low_cpu_mem_usage"] is pin_on_the_fly

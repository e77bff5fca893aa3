"""Node inputs (issue #13): IMAGE / MASK / LATENT / CONDITIONING checks, VALIDATE_INPUTS, the
Encode Expression frame range and model files confined to ComfyUI's folders. Rows of
docs/RELIABILITY.md."""

import copy
import os
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import nodes
from fantasyportrait_core.sampling import generate
from fantasyportrait_core.drive.encode import DrivingExpression
from fantasyportrait_core.faces.face import Face, FaceTrack
from fantasyportrait_core.validate import InputError
from fantasyportrait_core.media.video import read_video
from nodes import host
from nodes.portrait import ReferenceFaces

from .conftest import data_path

M = nodes.NODE_CLASS_MAPPINGS


def node(name):
    cls = M[name]
    return getattr(cls(), cls.FUNCTION)


# ----------------------------------------------------------------------------------------------
# IMAGE


@pytest.mark.parametrize("image, message", [
    (torch.zeros(0, 64, 64, 3), "empty batch"),
    (torch.full((1, 64, 64, 3), float("nan")), "12288 NaN/infinite value"),
    (torch.full((2, 64, 64, 3), 200.0), "looks like 0..255"),
    (torch.full((1, 64, 64, 3), -1.0), "looks like -1..1"),
    (torch.zeros(1, 16, 16, 3), "is 16x16; a face cannot be found"),
    (torch.zeros(1, 64, 64, 2), "must be an IMAGE"),
    (np.zeros((1, 64, 64, 3)), "must be an IMAGE tensor"),
])
def test_bad_images_are_named(image, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(".", r"\.")):
        host.image_to_uint8(image, "image")


def test_grayscale_rgba_single_and_overshoot_are_accepted():
    gray = torch.rand(2, 40, 48, 1)
    out = host.image_to_uint8(gray)
    assert out.shape == (2, 40, 48, 3) and (out[..., 0] == out[..., 2]).all()
    rgba = torch.rand(1, 40, 48, 4)
    np.testing.assert_array_equal(host.image_to_uint8(rgba), host.image_to_uint8(rgba[..., :3]))
    assert host.image_to_uint8(torch.rand(40, 48, 3)).shape == (1, 40, 48, 3)
    assert host.image_to_uint8(torch.full((1, 40, 48, 3), 1.02)).max() == 255  # resampling overshoot: clamped


class CountingDetector:
    """Wraps a detector and counts the frames it is shown."""

    def __init__(self, inner):
        self.inner, self.frames = inner, 0
        self.name = inner.name

    def detect(self, image):
        self.frames += 1
        return self.inner.detect(image)

    def detect_batch(self, images):
        self.frames += len(images)
        return self.inner.detect_batch(images)


def test_face_masks_refuses_tiny_and_nan_reference(detector):
    with pytest.raises(InputError, match="16x16"):
        node("FantasyPortraitFaceMasks")(detector, torch.rand(1, 16, 16, 3))
    ref = torch.rand(1, 96, 96, 3)
    ref[0, 5, 5, 1] = float("nan")
    with pytest.raises(InputError, match="image \\(reference\\) holds 1 NaN"):
        node("FantasyPortraitFaceMasks")(detector, ref)


def test_encode_expression_encodes_only_the_frames_asked(detector, tiny):
    frames = torch.from_numpy(read_video(data_path("jgz.mp4"), max_frames=12).frames).float() / 255
    counting = CountingDetector(detector)
    expr, crops, info = node("FantasyPortraitEncodeExpression")(tiny[3], counting, frames, 1, 0.0, max_frames=2,
                                                                start_frame=9)
    assert counting.frames == 2 and expr[0].num_frames == 2 and crops.shape[0] == 2
    with pytest.raises(InputError, match="start_frame 12 is past the end of the 12 driving frames"):
        node("FantasyPortraitEncodeExpression")(tiny[3], counting, frames, 1, 0.0, start_frame=12)
    with pytest.raises(InputError, match="empty batch"):
        node("FantasyPortraitEncodeExpression")(tiny[3], counting, frames[:0], 1, 0.0)
    with pytest.raises(InputError, match="driver shows 1 face\\(s\\) but 2 character"):
        node("FantasyPortraitEncodeExpression")(tiny[3], counting, frames[9:11], 2, 0.0)


# ----------------------------------------------------------------------------------------------
# MASK


def _static(box, n=5):
    box = np.asarray(box, float)
    return DrivingExpression(torch.zeros(n, 554),
                             FaceTrack(np.tile(box, (n, 1)), np.zeros((n, 5, 2)), np.ones(n, bool)))


@pytest.fixture
def two_faces():
    faces = [Face(np.array([10.0, 10, 40, 40]), np.zeros((5, 2)), 1.0),
             Face(np.array([80.0, 10, 110, 40]), np.zeros((5, 2)), 1.0)]
    return ReferenceFaces(faces, 128, 64, np.zeros((64, 128, 3), np.uint8)), [_static(f.box) for f in faces]


def _condition(two_faces, masks, n=2, face_order=""):
    ref, drivers = two_faces
    portrait, preview, _fps = node("FantasyPortraitConditioning")(
        ref, drivers[:1], 1.0, "left_to_right", face_order, masks, **({"expression_2": drivers[1:]} if n == 2 else {}))
    return portrait, preview


@pytest.mark.parametrize("shape", [(2, 64, 128), (2, 1, 64, 128), (2, 32, 64)])
def test_mask_layouts_count_per_character(two_faces, shape):
    masks = torch.zeros(shape)
    masks[0, ..., : shape[-1] // 2] = 1.0
    portrait, _ = _condition(two_faces, masks)
    assert portrait.user_masks[0] is not None and portrait.user_masks[1] is None  # empty mask keeps the box
    assert portrait.user_masks[0].shape == shape[-2:]


def test_single_hw_mask_for_one_character(two_faces):
    portrait, _ = _condition(two_faces, torch.ones(64, 128), n=1)
    assert len(portrait.user_masks) == 1 and portrait.user_masks[0].shape == (64, 128)


@pytest.mark.parametrize("masks, message", [
    (torch.ones(2, 64, 64), "masks are 64x64 but the reference image is 128x64 \\(another aspect ratio\\)"),
    (torch.ones(3, 64, 128), "masks has 3 mask\\(s\\) for 2 character"),
    (torch.full((2, 64, 128), float("nan")), "masks holds 16384 NaN"),
    (torch.full((2, 64, 128), 255.0), "a MASK holds 0..1"),
    (torch.ones(2, 3, 64, 128), "must be a MASK"),
    (torch.ones(0, 64, 128), "masks is empty"),
])
def test_bad_masks_are_refused(two_faces, masks, message):
    with pytest.raises(InputError, match=message):
        _condition(two_faces, masks)


def test_conditioning_preview_lists_unused_faces(two_faces, caplog):
    portrait, preview = _condition(two_faces, None, n=1, face_order="1")
    assert portrait.faces[0] is two_faces[0].faces[1]
    assert "face(s) #0 have no driving expression" in caplog.text


def test_validate_inputs_at_queue_time():
    cond, sampler = M["FantasyPortraitConditioning"], M["FantasyPortraitSampler"]
    assert cond.VALIDATE_INPUTS(face_order="1,0") is True and cond.VALIDATE_INPUTS(face_order=None) is True
    assert "must be comma-separated face numbers" in cond.VALIDATE_INPUTS(face_order="first")
    assert "names a face twice" in cond.VALIDATE_INPUTS(face_order="0,0")
    assert sampler.VALIDATE_INPUTS(context_frames=81, context_overlap=16) is True
    assert "context_overlap (16) must be less than context_frames (9)" in sampler.VALIDATE_INPUTS(9, 16)
    assert "context_frames must be between 5 and 100000, got 200000" in sampler.VALIDATE_INPUTS(200000, 16)
    assert sampler.VALIDATE_INPUTS(None, 16) is True  # linked input: value unknown at queue time


# ----------------------------------------------------------------------------------------------
# LATENT and CONDITIONING


@pytest.fixture(scope="module")
def model(tiny):
    from nodes.loaders import build_portrait_model

    return build_portrait_model(copy.deepcopy(tiny[0]), copy.deepcopy(tiny[1]), torch.float32)


def _cond(model, f_lat=2, h=4, w=4):
    c = model.transformer.config
    extra = {"concat_latent_image": torch.zeros(1, 16, f_lat, h, w),
             "clip_vision_output": SimpleNamespace(penultimate_hidden_states=torch.zeros(1, 257, c.image_dim))}
    return [[torch.zeros(1, 8, c.text_dim), extra]]


@pytest.mark.parametrize("samples, message", [
    (torch.zeros(1, 16, 0, 4, 4), "has 0 latent frames"),
    (torch.zeros(2, 16, 2, 4, 4), "batch size 2"),
    (torch.full((1, 16, 2, 4, 4), float("nan")), "latent holds 512 NaN"),
    (torch.zeros(1, 4, 2, 4, 4), "must be a Wan2.1 video latent"),
])
def test_bad_latents_fail_before_sampling(model, two_faces, monkeypatch, samples, message):
    monkeypatch.setattr(generate, "generate_latent", lambda *a, **k: pytest.fail("sampled a bad latent"))
    portrait, _ = _condition(two_faces, None)
    pos = _cond(model)
    with pytest.raises(InputError, match=message):
        node("FantasyPortraitSampler")(model, portrait, pos, pos, {"samples": samples}, 0, 1)


def test_nan_in_conditioning_fails_before_sampling(model, two_faces, monkeypatch):
    monkeypatch.setattr(generate, "generate_latent", lambda *a, **k: pytest.fail("sampled NaN conditions"))
    portrait, _ = _condition(two_faces, None)
    pos = _cond(model)
    pos[0][1]["concat_latent_image"][0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(InputError, match="positive \\(reference image latent\\) holds 1 NaN/infinite"):
        node("FantasyPortraitSampler")(model, portrait, pos, pos, {"samples": torch.zeros(1, 16, 2, 4, 4)}, 0, 1)
    pos = _cond(model)
    pos[0][0][0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="positive \\(text embedding\\) holds 1 NaN"):
        node("FantasyPortraitSampler")(model, portrait, pos, pos, {"samples": torch.zeros(1, 16, 2, 4, 4)}, 0, 1)
    with pytest.raises(InputError, match="context_overlap \\(16\\) must be less than context_frames \\(9\\)"):
        node("FantasyPortraitSampler")(model, portrait, _cond(model), _cond(model),
                                       {"samples": torch.zeros(1, 16, 2, 4, 4)}, 0, 1, context_frames=9,
                                       context_overlap=16)


def test_sampler_failure_leaves_the_model_as_loaded(model, two_faces, monkeypatch):
    before = dict(model.transformer.attn_processors)

    def crash(transformer, state, *a, **k):
        state.condition = "attached"
        transformer.blocks[0].register_forward_pre_hook(lambda *x: None)
        raise RuntimeError("driver crashed")

    monkeypatch.setattr(generate, "generate_latent", crash)
    portrait, _ = _condition(two_faces, None)
    with pytest.raises(RuntimeError, match="driver crashed"):
        node("FantasyPortraitSampler")(model, portrait, _cond(model), _cond(model),
                                       {"samples": torch.zeros(1, 16, 2, 4, 4)}, 0, 1)
    assert model.state.condition is None and model.transformer.attn_processors == before
    assert not model.transformer.blocks[0]._forward_pre_hooks


def test_sampler_oom_names_the_loader_settings(model, two_faces, monkeypatch, caplog):
    """The very ``torch.OutOfMemoryError`` leaves the node (ComfyUI's ``OOM_EXCEPTION`` is
    ``torch.cuda.OutOfMemoryError``: only for it does its executor unload every model and show its
    OOM tips), with what to change added to its message, its notes and the log (issue 21, defect 7:
    it used to be re-raised as a new RuntimeError)."""
    raised = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def oom(*a, **k):
        raise raised

    monkeypatch.setattr(generate, "generate_latent", oom)
    portrait, _ = _condition(two_faces, None)
    with caplog.at_level("ERROR", logger="FantasyPortrait"), \
            pytest.raises(torch.cuda.OutOfMemoryError, match="ran out of GPU memory .*32x32, 5 frames.*storage = "
                                                           "fp8_e4m3fn") as info:
        node("FantasyPortraitSampler")(model, portrait, _cond(model), _cond(model),
                                       {"samples": torch.zeros(1, 16, 2, 4, 4)}, 0, 1)
    assert info.value is raised and type(info.value) is torch.OutOfMemoryError
    assert str(info.value).startswith("CUDA out of memory. Tried to allocate 2.00 GiB\n")
    assert any("offload = block" in n for n in info.value.__notes__)
    assert any("ran out of GPU memory" in r.getMessage() for r in caplog.records)
    assert model.state.condition is None


# ----------------------------------------------------------------------------------------------
# Model files


@pytest.fixture
def fake_comfy_folders(tmp_path, monkeypatch):
    root = tmp_path / "models" / "fantasyportrait"
    root.mkdir(parents=True)
    (root / "pd_fpg.pth").write_bytes(b"x")
    outside = tmp_path / "secret.ckpt"
    outside.write_bytes(b"x")
    fp = types.SimpleNamespace(
        folder_names_and_paths={"fantasyportrait": ([str(root)], {".pth"})},
        get_folder_paths=lambda folder: [str(root)],
        get_full_path=lambda folder, name: os.path.join(str(root), name)
        if os.path.isfile(os.path.join(str(root), name)) else None)
    monkeypatch.setattr(host, "folder_paths", fp)
    return root, outside


def test_loaders_take_only_files_in_comfy_model_folders(fake_comfy_folders):
    root, outside = fake_comfy_folders
    assert host.model_path("fantasyportrait", "pd_fpg.pth") == str(root / "pd_fpg.pth")
    with pytest.raises(InputError, match="must be chosen from ComfyUI's 'fantasyportrait' folder"):
        host.model_path("fantasyportrait", str(outside))
    with pytest.raises(InputError, match="not given as a path"):
        host.model_path("fantasyportrait", "../../secret.ckpt")
    with pytest.raises(FileNotFoundError, match="'missing.pth' not found in ComfyUI model folder 'fantasyportrait'"):
        host.model_path("fantasyportrait", "missing.pth")


def test_conditioning_from_another_model_is_named(model, two_faces, monkeypatch):
    monkeypatch.setattr(generate, "generate_latent", lambda *a, **k: pytest.fail("sampled foreign conditioning"))
    portrait, _ = _condition(two_faces, None)
    pos = _cond(model)
    pos[0][0] = torch.zeros(1, 8, 4096 + 1)
    with pytest.raises(InputError, match="text embeddings are 4097-wide but the transformer takes 32: .*umT5"):
        node("FantasyPortraitSampler")(model, portrait, pos, pos, {"samples": torch.zeros(1, 16, 2, 4, 4)}, 0, 1)


def test_queue_validator_checks_dropdowns_and_node_rules(monkeypatch):
    """The V3 registration's validate_inputs: ComfyUI 0.3.x does not check V3 dropdown values when a
    prompt is queued, so a workflow naming a model file the user lacks is refused there, by name."""
    import inspect

    monkeypatch.setattr(host, "list_models", lambda folder: {"diffusion_models": ["wan_i2v.safetensors"],
                                                             "fantasyportrait": ["fp.safetensors"]}.get(folder, []))
    loader = host.queue_validator(M["FantasyPortraitWanModelLoader"])
    assert inspect.getfullargspec(classmethod(loader).__get__(None, object)).args == \
        ["cls", "transformer", "adapter", "weight_dtype", "storage", "offload", "fast_mode", "attention", "transformer_2"]
    assert loader(None, transformer="wan_i2v.safetensors", adapter="fp.safetensors", weight_dtype="bf16") is True
    msg = loader(None, transformer="wan_i2v.safetensors", adapter="missing.safetensors")
    assert msg.startswith("adapter: 'missing.safetensors' is not one of the 1 choices (fp.safetensors)")
    cond = host.queue_validator(M["FantasyPortraitConditioning"])
    assert cond(None, assignment="left_to_right", face_order="1,0") is True
    assert "assignment: 'random' is not one of the 4 choices" in cond(None, assignment="random")
    assert "must be comma-separated" in cond(None, assignment="left_to_right", face_order="x")
    assert host.queue_validator(M["FantasyPortraitFaceMasks"]) is None


def test_encode_expression_says_how_many_people_it_used(detector, tiny):
    frames = torch.from_numpy(read_video(data_path("two_person.mp4"), max_frames=2).frames).float() / 255
    expr, _, info = node("FantasyPortraitEncodeExpression")(tiny[3], detector, frames, 1, 0.0)
    assert len(expr) == 1 and expr[0].people_seen == 2
    assert info.splitlines()[:2] == ["detector: mtcnn", "the video shows 2 people; 1 used (raise people to use more)"]

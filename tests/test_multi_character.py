"""Several characters: detection on tiled portraits, assignment modes, per-person independence
through the full masked cross-attention, and the errors users hit."""

import copy
import os

import cv2
import numpy as np
import pytest
import torch

from fantasyportrait_core.drive import encode as drive_encode
from fantasyportrait_core.drive.condition import portrait_condition
from fantasyportrait_core.faces.assign import assign_faces
from fantasyportrait_core.faces.layout import generation_size, reference_layout
from fantasyportrait_core.model.attention import attach_portrait_processors
from fantasyportrait_core.faces.detect import make_detector
from fantasyportrait_core.faces.official import decode_gfl, letterbox_matrix
from fantasyportrait_core.faces.face import Face, FaceTrack
from fantasyportrait_core.media.video import read_image

from .conftest import data_path


def tiled(n: int) -> np.ndarray:
    """2: two_person.png; 3: two_person + man; 4: two_person twice (faces side by side)."""
    two = read_image(data_path("two_person.png"))
    h = two.shape[0]
    man = read_image(data_path("man.jpeg"))
    man = cv2.resize(man, (h, h), interpolation=cv2.INTER_AREA)
    parts = {2: [two], 3: [two, man], 4: [two, two]}[n]
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


def static_driver(face_box, features: torch.Tensor) -> drive_encode.DrivingExpression:
    f = features.shape[0]
    boxes = np.tile(np.asarray(face_box, float), (f, 1))
    track = FaceTrack(boxes, np.zeros((f, 5, 2)), np.ones(f, bool))
    return drive_encode.DrivingExpression(features, track)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_each_character_depends_only_on_its_own_driver(n, detector, tiny):
    image = tiled(n)
    faces = detector.detect(image)
    assert len(faces) == n
    xs = [f.center[0] for f in faces]
    assert xs == sorted(xs)

    width, height = generation_size(image.shape[1], image.shape[0], max_size=512)
    k = width / image.shape[1]
    gen_faces = [Face(f.box * k, f.landmarks * k, f.score) for f in faces]
    num_frames = 5
    g = torch.Generator().manual_seed(n)
    drivers = [static_driver(f.box, torch.randn(num_frames, 554, generator=g)) for f in gen_faces]
    layout = reference_layout(assign_faces(gen_faces, n), drivers, width, height, num_frames)
    ids = layout.latent_person.reshape(-1)
    for person in range(1, n + 1):
        assert (ids == person).any(), f"character {person - 1} has no latent tokens"
    assert (ids == 0).any()

    transformer, adapter, _, _ = tiny
    model = copy.deepcopy(transformer)
    state = attach_portrait_processors(model, adapter)
    attn = model.blocks[1].attn2
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    hidden = torch.randn(1, ids.numel(), dim, generator=g)
    context = torch.randn(1, 257 + 512, dim, generator=g)
    with torch.no_grad():
        state.condition = portrait_condition(adapter, drivers, num_frames, layout)
        base = attn(hidden, context)
        state.condition = None
        plain = attn(hidden, context)
        assert torch.equal(base[0, ids == 0], plain[0, ids == 0]), "background gets no portrait tokens"
        for victim in range(n):
            moved = list(drivers)
            moved[victim] = static_driver(drivers[victim].track.boxes[0], drivers[victim].features + 3.0)
            state.condition = portrait_condition(adapter, moved, num_frames, layout)
            out = attn(hidden, context)
            delta = (out - base).abs().sum(-1)[0]
            assert delta[ids == victim + 1].min() > 0
            assert delta[ids != victim + 1].max() == 0
    state.condition = None


def _faces_with_embeddings():
    rng = np.random.default_rng(0)
    embs = rng.normal(size=(3, 16))
    sizes = [30, 50, 40]
    faces = [Face(np.array([100.0 * i, 0, 100.0 * i + s, s]), np.zeros((5, 2)), 0.9, embs[i]) for i, s in enumerate(sizes)]
    return faces, embs


def test_assignment_modes_give_documented_order():
    faces, embs = _faces_with_embeddings()
    pick = lambda **kw: [faces.index(f) for f in assign_faces(faces, **kw)]
    assert pick(count=3) == [0, 1, 2]
    assert pick(count=2, mode="right_to_left") == [2, 1]
    assert pick(count=3, mode="largest_first") == [1, 2, 0]
    assert pick(count=1) == [1]  # one character: the largest face
    assert pick(count=2, order=[2, 0]) == [2, 0]
    # identity: drivers given in a shuffled order are matched back to their own faces
    shuffled = [2, 0, 1]
    noisy = [embs[j] + 0.05 * np.random.default_rng(j).normal(size=16) for j in shuffled]
    assert pick(count=3, mode="identity", driver_embeddings=noisy) == shuffled
    assert pick(count=2, mode="identity", driver_embeddings=noisy[:2]) == shuffled[:2]


def test_assignment_errors():
    faces, _ = _faces_with_embeddings()
    with pytest.raises(ValueError, match="no face"):
        assign_faces([], 1)
    with pytest.raises(ValueError, match="shows 3 face.*4 driving"):
        assign_faces(faces, 4)
    with pytest.raises(ValueError, match="distinct"):
        assign_faces(faces, 2, order=[1, 1])
    with pytest.raises(ValueError, match="insightface"):
        assign_faces([Face(f.box, f.landmarks, f.score) for f in faces], 2, mode="identity",
                     driver_embeddings=[None, None])
    with pytest.raises(ValueError, match="unknown assignment"):
        assign_faces(faces, 2, mode="random")


def test_driving_video_without_any_face(detector, tiny):
    frames = np.zeros((5, 64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="no face was found in any of its 5 frame"):
        drive_encode.encode_driving(detector, tiny[3], frames)


def test_one_video_with_two_people(detector, tiny):
    from fantasyportrait_core.media.video import read_video

    frames = read_video(data_path("two_person.mp4"), max_frames=9).frames
    drivers = drive_encode.encode_driving(detector, tiny[3], frames, people=2, smooth=1.0)
    assert len(drivers) == 2 and all(d.num_frames == 9 for d in drivers)
    assert drivers[0].track.boxes[:, 0].mean() < drivers[1].track.boxes[:, 0].mean()
    assert all(not d.track.missing for d in drivers)
    with pytest.raises(ValueError, match="shows 2 face.*3 character"):
        drive_encode.encode_driving(detector, tiny[3], frames, people=3)


def test_user_mask_replaces_region():
    faces = [Face(np.array([0.0, 0, 32, 32]), np.zeros((5, 2)), 1.0), Face(np.array([64.0, 0, 96, 32]), np.zeros((5, 2)), 1.0)]
    drivers = [static_driver(f.box, torch.zeros(5, 554)) for f in faces]
    user = torch.zeros(64, 128)
    user[32:64, 96:128] = 1.0  # character 1's region moved to the bottom-right corner
    layout = reference_layout(faces, drivers, 128, 64, 5, [None, user])
    grid = layout.latent_person[0].view(4, 8)
    assert grid[0:2, 0:2].eq(1).all()  # character 0 keeps its box
    assert grid[2:4, 6:8].eq(2).all() and not grid[0:2, 4:6].eq(2).any()


# ------------------------------------------------------------------- detector backends


def test_gfl_decoding_and_letterbox():
    m = letterbox_matrix(1000, 500)  # wide image: width fits 160
    centre = m[:, :2] @ np.array([500.0, 250.0]) + m[:, 2]
    np.testing.assert_allclose(centre, [80, 136])
    np.testing.assert_allclose(m[0, 0], 0.16)
    # one stride-8 cell peaked at bin 2 on every side -> a 32x32 box around its centre
    scores = [np.zeros(680), np.zeros(170), np.zeros(45)]
    dists = [np.full((680, 32), -20.0), np.full((170, 32), -20.0), np.full((45, 32), -20.0)]
    cell = 3 * 20 + 5  # row 3, col 5 -> centre (40, 24)
    dists[0][cell].reshape(4, 8)[:, 2] = 20.0
    boxes, probs = decode_gfl(scores, dists)
    np.testing.assert_allclose(boxes[cell], [24, 8, 56, 40], atol=1e-6)
    assert len(boxes) == len(probs) == 680 + 170 + 45


def test_missing_backend_models_name_the_folder(tmp_path, monkeypatch):
    from fantasyportrait_core.faces import packages
    monkeypatch.setattr(packages, "_importable", lambda module: True)  # the files are what is missing
    with pytest.raises(FileNotFoundError, match="face_det.onnx"):
        make_detector("official", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=os.path.join("models", "buffalo_l")):
        make_detector("insightface", str(tmp_path))
    with pytest.raises(ValueError, match="unknown face detector"):
        make_detector("dlib")


ONNX_DIR = os.environ.get("FANTASYPORTRAIT_ONNX_DIR") or next(
    (d for d in [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "models",
                              "fantasyportrait_official")] if os.path.isfile(os.path.join(d, "face_det.onnx"))), None)


@pytest.mark.skipif(not ONNX_DIR, reason="no face_det.onnx + face_landmark.onnx in "
                                         "../shared/models/fantasyportrait_official (or set FANTASYPORTRAIT_ONNX_DIR "
                                         "to a folder holding them)")
def test_official_onnx_backend_on_shared_inputs():
    det = make_detector("official", ONNX_DIR)
    (man,) = det.detect(read_image(data_path("man.jpeg")))
    np.testing.assert_allclose(man.box, [274, 271, 674, 674])  # what the reference code gives
    two = det.detect(read_image(data_path("two_person.png")))
    assert len(two) == 2 and two[0].center[0] < two[1].center[0]

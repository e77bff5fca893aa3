"""Face detector backends: the ``auto`` choice, optional packages, the official ONNX pair's pipeline
on tiny ONNX files with the release's input/output layout, and what the nodes and the CLI say ran."""

import json
import os

import numpy as np
import pytest

from fantasyportrait_core.faces import detect as D
from fantasyportrait_core.faces import packages as PK
from fantasyportrait_core.faces.mtcnn import MtcnnDetector
from .conftest import data_path

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

# The release's layout (reference diffsynth/models/face_det.py, face_align.py): the detector takes
# [1, 3, 272, 160] and returns 3 score maps then 3 GFL distance maps (strides 8, 16, 32; 8 bins per
# side); the landmark model takes [1, 3, 128, 128] in 0..1 and returns 222 x then 222 y coordinates
# in crop units, an euler output and a face probability.
DET_CELLS = {8: 20 * 34, 16: 10 * 17, 32: 5 * 9}
FACE_CELL = 15 * 20 + 10  # stride-8 cell at row 15, column 10: anchor centre (80, 120) in the input


def _constant_model(path, input_shape, outputs):
    """An ONNX model whose outputs are the given constants (+ 0 × mean(input), so the input is used)."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], keepdims=0),
             helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])),
             helper.make_node("Mul", ["mean", "zero"], ["nothing"])]
    outs = []
    for name, value in outputs.items():
        value = np.asarray(value, np.float32)
        nodes.append(helper.make_node("Constant", [], [f"{name}_c"], value=helper.make_tensor(
            f"{name}_t", TensorProto.FLOAT, value.shape, value.reshape(-1).tolist())))
        nodes.append(helper.make_node("Add", [f"{name}_c", "nothing"], [name]))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)], outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


# Landmark pattern in crop units (0..1): bounding box [0.2, 0.8]², eye corners 74/96 level (no roll).
PATTERN = np.full((222, 2), 0.5)
PATTERN[0], PATTERN[1] = (0.2, 0.2), (0.8, 0.8)
PATTERN[74], PATTERN[96] = (0.3, 0.4), (0.7, 0.4)
PATTERN[182], PATTERN[202], PATTERN[36] = (0.35, 0.4), (0.65, 0.4), (0.5, 0.55)  # pupils, nose tip
PATTERN[149], PATTERN[133] = (0.38, 0.72), (0.62, 0.72)  # mouth corners


def write_official_pair(folder):
    """face_det.onnx finding one face (stride-8 cell FACE_CELL, 2 bins = 16 px each side) and
    face_landmark.onnx returning PATTERN for any crop."""
    os.makedirs(folder, exist_ok=True)
    outs = {}
    for s, n in DET_CELLS.items():
        outs[f"score{s}"] = np.zeros((1, n, 1))
    for s, n in DET_CELLS.items():
        dist = np.full((1, n, 32), -20.0)
        if s == 8:
            dist[0, FACE_CELL].reshape(4, 8)[:, 2] = 20.0
        outs[f"dist{s}"] = dist
    outs["score8"][0, FACE_CELL, 0] = 0.9
    _constant_model(os.path.join(folder, "face_det.onnx"), [1, 3, 272, 160], outs)
    _constant_model(os.path.join(folder, "face_landmark.onnx"), [1, 3, 128, 128],
                    {"landmark": PATTERN.T.reshape(1, 444), "euler": np.zeros((1, 3)), "prob": np.ones((1, 1))})
    return str(folder)


def _no(*modules):
    """A stand-in for packages._importable where ``modules`` are not installed."""
    real = PK._importable
    return lambda m: m not in modules and real(m)


# ------------------------------------------------------------------------------- auto's choice


def test_auto_without_the_onnx_files_runs_mtcnn(tmp_path):
    (tmp_path / "face_det.onnx").write_bytes(b"x")  # one of the two is not enough
    assert D.choose_auto_backend(str(tmp_path)) == ("mtcnn", f"no face_landmark.onnx in {tmp_path}")
    det = D.make_detector("auto", str(tmp_path / "empty"))
    assert det.name == "mtcnn" and isinstance(det, MtcnnDetector)
    assert det.info == f"mtcnn (auto: no face_det.onnx / face_landmark.onnx in {tmp_path / 'empty'})"


def test_auto_with_the_onnx_files_but_no_onnxruntime_runs_mtcnn(tmp_path, monkeypatch):
    d = write_official_pair(tmp_path)
    monkeypatch.setattr(PK, "_importable", _no("onnxruntime"))
    backend, why = D.choose_auto_backend(d)
    assert backend == "mtcnn" and "onnxruntime is not installed" in why and "pip install onnxruntime-gpu" in why
    assert D.make_detector("auto", d).name == "mtcnn"


def test_broken_onnxruntime_install_is_named_with_the_repair(tmp_path, monkeypatch):
    """What is left after onnxruntime is uninstalled from under onnxruntime-gpu (seen in a real venv,
    docs/INSTALL.md): the package folder imports but has no InferenceSession."""
    import importlib.machinery
    import sys
    import types

    half = types.ModuleType("onnxruntime")
    half.__spec__ = importlib.machinery.ModuleSpec("onnxruntime", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", half)
    d = write_official_pair(tmp_path)
    backend, why = D.choose_auto_backend(d)
    assert backend == "mtcnn" and "onnxruntime is installed but broken (AttributeError" in why
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in why
    with pytest.raises(PK.BackendUnavailable, match="pip uninstall -y onnxruntime onnxruntime-gpu"):
        D.make_detector("official", d)


def test_auto_with_the_onnx_files_runs_the_official_pair(tmp_path):
    pytest.importorskip("onnxruntime")
    d = write_official_pair(tmp_path)
    assert D.choose_auto_backend(d) == ("official", f"face_det.onnx + face_landmark.onnx found in {d}")
    det = D.make_detector("auto", d)
    assert det.name == "official" and det.info.startswith("official onnx (auto: ")
    assert det.tiles  # on by default; this tiny detector "finds" its face at the same cell of any input,
    det.tiles = False  # so each portrait tile of the 1280x720 frame would add one: whole-image pass only
    (face,) = det.detect(np.zeros((720, 1280, 3), np.uint8))
    # Letterbox 1280x720 -> 160x272: scale 1/8, 91 px of padding on top. The cell's box in the
    # input, centre (80, 120) +- 16, is [64, 104, 96, 136] -> [512, 104, 768, 360] in the image.
    np.testing.assert_array_equal(face.box, [512, 104, 768, 360])
    assert face.score == pytest.approx(0.9)
    # The landmark crop is square around the box with a 15 % margin (scale 128 / 256 · 0.85), then
    # twice around the previous points, whose extent (0.6 of the crop) is fitted to 0.85 of it:
    # the scale grows by 0.85 / 0.6 per pass. Final points: centre + (p - 0.5) · 128 / scale.
    scale = 128 / 256 * 0.85 * (0.85 / 0.6) ** 2
    expected = np.array([640.0, 232.0]) + (PATTERN[[182, 202, 36, 149, 133]] - 0.5) * 128 / scale
    np.testing.assert_allclose(face.landmarks, expected, atol=0.05)


def test_official_pair_that_onnxruntime_cannot_read_is_named(tmp_path):
    pytest.importorskip("onnxruntime")
    (tmp_path / "face_det.onnx").write_bytes(b"not an onnx file")
    (tmp_path / "face_landmark.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ValueError, match="face_det.onnx could not be loaded by onnxruntime"):
        D.make_detector("auto", str(tmp_path))


# ------------------------------------------------------------------------------ optional backends


@pytest.mark.parametrize("backend, module, command", [
    ("mediapipe", "mediapipe", "pip install mediapipe==0.10.21"),
    ("insightface", "insightface", "pip install insightface"),
    ("insightface", "onnxruntime", "pip install insightface"),
    ("official", "onnxruntime", "pip install onnxruntime-gpu"),
    ("mtcnn", "facenet_pytorch", "pip install facenet-pytorch==2.5.3"),
])
def test_missing_backend_package_names_the_pip_command(backend, module, command, tmp_path, monkeypatch):
    monkeypatch.setattr(PK, "_importable", _no(module))
    write_official_pair(tmp_path)  # files present: the package is what is missing
    with pytest.raises(PK.BackendUnavailable) as err:
        D.make_detector(backend, str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and f"'{backend}'" in message and module in message and command in message
    assert isinstance(err.value, ImportError)


def test_detector_node_keeps_stored_option_strings_and_defaults_to_auto(tmp_path, monkeypatch):
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["FantasyPortraitFaceDetectorLoader"]
    options, spec = cls.INPUT_TYPES()["required"]["backend"]
    # Strings saved in workflows before auto existed must still load.
    assert {"mtcnn (offline)", "mediapipe (offline)", "insightface buffalo_l", "insightface antelopev2",
            "official onnx"} <= set(options)
    assert spec["default"] == "auto"
    monkeypatch.setattr(PK, "_importable", _no("mediapipe"))
    assert "Not installed: mediapipe (needs mediapipe)" in cls.INPUT_TYPES()["required"]["backend"][1]["tooltip"]
    # Outside ComfyUI the node looks in ./models/fantasyportrait.
    monkeypatch.chdir(tmp_path)
    (det,) = cls().load("auto")
    assert det.name == "mtcnn" and "models/fantasyportrait" in det.info.replace(os.sep, "/")
    with pytest.raises(PK.BackendUnavailable, match="pip install mediapipe"):
        cls().load("mediapipe (offline)")
    if PK._importable("onnxruntime"):
        write_official_pair(tmp_path / "models" / "fantasyportrait")
        (det,) = cls().load("auto")
        assert det.name == "official"


def test_face_masks_preview_and_cli_report_name_the_detector(tmp_path, capsys):
    import cv2
    import torch

    import nodes
    from fantasyportrait_core.cli import main
    from fantasyportrait_core.faces.preview import draw_faces
    from fantasyportrait_core.media.video import read_image

    image = cv2.resize(read_image(data_path("man.jpeg")), (320, 320), interpolation=cv2.INTER_AREA)
    det = D.make_detector("auto", str(tmp_path))
    masks = nodes.NODE_CLASS_MAPPINGS["FantasyPortraitFaceMasks"]()
    _, _, preview = masks.detect(det, torch.from_numpy(image)[None].float() / 255)
    preview = (preview[0].numpy() * 255).round().astype(np.uint8)
    plain = draw_faces(image, det.detect(image))
    changed = np.flatnonzero(np.any(preview != plain, axis=(1, 2)))
    # Only a band along the bottom edge is written: darkened, with white text in it.
    assert len(changed) and changed.min() > 0.9 * len(preview) and changed.max() == len(preview) - 1
    band = preview[changed.min():]
    assert (band >= 250).all(-1).sum() > 100 > 10 * (plain[changed.min():] >= 250).all(-1).sum()

    out = str(tmp_path / "one.mp4")
    assert main(["run", "--tiny-random", "--image", data_path("man.jpeg"), "--driving", data_path("jgz.mp4"),
                 "--out", out, "--frames", "1", "--max-size", "96", "--steps", "1", "--device", "cpu",
                 "--detector-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    report = json.loads(text[text.index("{"):])
    assert report["detector"] == f"mtcnn (auto: no face_det.onnx / face_landmark.onnx in {tmp_path})"


def test_cli_missing_backend_is_one_line(tmp_path, monkeypatch, capsys):
    from fantasyportrait_core.cli import main

    monkeypatch.setattr(PK, "_importable", _no("mediapipe"))
    rc = main(["run", "--tiny-random", "--image", data_path("man.jpeg"), "--driving", data_path("jgz.mp4"),
               "--out", str(tmp_path / "x.mp4"), "--frames", "5", "--max-size", "64", "--steps", "1",
               "--detector", "mediapipe"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "pip install mediapipe==0.10.21" in err


# ------------------------------------------------------------------------------- the benchmark


def test_crowded_scenes_are_deterministic_with_exact_face_sizes():
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench_detectors as B

    data = os.path.dirname(data_path("man.jpeg"))
    a, b = B.compose_scenes(data), B.compose_scenes(data)
    assert [name for name, _, _ in a] == [name for name, _, _ in b]
    for (_, img_a, box_a), (_, img_b, box_b) in zip(a, b):
        assert img_a.shape == (720, 1280, 3) and np.array_equal(img_a, img_b) and np.array_equal(box_a, box_b)
        assert (box_a >= 0).all() and (box_a[:, 2] <= 1280).all() and (box_a[:, 3] <= 720).all()
    crowd = a[-1][2]
    np.testing.assert_allclose(crowd[:, 2] - crowd[:, 0], B.CROWD_WIDTHS, atol=1e-6)
    for scale, (_, _, boxes) in zip(B.GROUP_SCALES, a):
        np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], 150 * scale, atol=1e-6)
    # A detection hits a true face only with its centre inside and a width within 0.5-2x.
    from fantasyportrait_core.faces.face import Face

    truth = np.array([[100.0, 100, 140, 150]])
    face = lambda box: Face(box=np.array(box, float), landmarks=np.zeros((5, 2)), score=0.99)  # noqa: E731
    assert B.match_boxes([face([105, 110, 139, 148])], truth) == ([0], 0)
    assert B.match_boxes([face([60, 60, 200, 200])], truth) == ([None], 1)  # 3.5x too wide
    assert B.match_boxes([face([150, 100, 190, 150])], truth) == ([None], 1)  # centre outside


def test_detector_benchmark_runs_tiny():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_detectors.py"), "--tiny",
                          "--detector-dir", os.path.join(root, "no-such-folder")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert any(r.startswith("| jgz.mp4 | 512×512 | 4 × 1 | mtcnn min_face 20 |") for r in rows), out.stdout
    assert any(r.startswith("| crowd 15-300 px (12 faces) | 1280×720 | 1 × 12 | mtcnn") for r in rows), out.stdout
    assert any("official onnx | not measured: no face_det.onnx / face_landmark.onnx in" in r for r in rows), out.stdout


def test_crop_shift_is_the_move_of_the_face_in_the_224_crop():
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench_detectors as B
    from fantasyportrait_core.model.expression import ALIGN_TEMPLATE, umeyama

    ref = np.array([[100, 110], [160, 108], [131, 140], [108, 170], [156, 168]], float)
    assert B.crop_shift(ref, ref) == pytest.approx(0, abs=1e-9)
    # points found 3 px right of the true ones: the face lands 3 px · crop scale left of the template
    scale = np.linalg.norm(umeyama(ref, ALIGN_TEMPLATE * 224)[:, 0])
    assert B.crop_shift(ref + [3, 0], ref) == pytest.approx(3 * scale, rel=1e-9)

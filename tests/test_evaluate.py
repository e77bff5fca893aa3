"""Expression-fidelity evaluation on the shared videos: a clip against itself, a time-shifted copy,
another performer and a frame-reversed copy; the metric definitions on hand-made inputs; the
multi-character matching, the CLI and the node.

The PD-FGC encoder here is randomly initialised (no weights can be downloaded): tests on its
features rely only on what holds for any fixed encoder (identical crops -> distance 0; crops two
frames apart are closer than crops of another person). The ordering tests on motion rely on the
eye/mouth/width curves, which need no learned weights.
"""

import json
import os

import cv2
import numpy as np
import pytest
import torch

from fantasyportrait_core.evaluation.compare import compare, evaluate
from fantasyportrait_core.evaluation.measure import (CURVES, MEASURE_SIZE, crop_curves, face_motion, measure_driving,
                                                     mesh_curves, mouth_width)
from fantasyportrait_core.evaluation.metrics import (EXPRESSION, POSE, curve_metrics, feature_metrics, identity_metrics,
                                                     overall_score)
from fantasyportrait_core.model.expression import ALIGN_TEMPLATE
from fantasyportrait_core.media.video import read_video

from .conftest import data_path

CLIP = 64  # frames of biden/trump measured (2.6 s at 25 fps; biden blinks at frame ~48)
FEATURE_FRAMES = 12  # frames encoded with PD-FGC (the slow part on CPU)
# jgz.mp4 frames 0-9 (0.67 s at 15 fps): from a teeth-together grin to a wide-open laugh, a
# one-way mouth opening. Played backwards it is a closing, so any correct mouth measure must
# anti-correlate with the original over this segment (an open-close cycle would not: a symmetric
# bump reversed is nearly itself).
JGZ_OPENING = slice(0, 10)


@pytest.fixture(scope="module")
def det():
    from fantasyportrait_core.faces.mtcnn import MtcnnDetector

    # The shared clips show faces of 150+ px: skipping the small pyramid scales is 5x faster on CPU.
    return MtcnnDetector(min_face_size=80)


@pytest.fixture(scope="module")
def encoder():
    from fantasyportrait_core.model.expression import FanEncoder

    torch.manual_seed(0)
    return FanEncoder().eval()


def _clip(name, frames):
    return read_video(data_path(name), max_frames=frames).frames


@pytest.fixture(scope="module")
def performers(det, encoder):
    """biden and trump: curves over CLIP frames, PD-FGC features over the first FEATURE_FRAMES + 2."""
    out = {}
    for name in ("biden.mp4", "trump.mp4"):
        frames = _clip(name, CLIP)
        (motion,) = measure_driving(det, [frames])
        short = motion.frames(slice(0, FEATURE_FRAMES + 2))
        featured = face_motion(frames[:FEATURE_FRAMES + 2], short.track, encoder)
        out[name] = (motion, featured)
    return out


def _metrics(ev):
    (ch,) = ev.report["characters"]
    return ch


def test_video_against_itself_scores_perfectly(det, encoder):
    frames = _clip("jgz.mp4", 5)
    ev = evaluate(det, [frames], frames.copy(), encoder=encoder, encoder_random=True)
    ch = _metrics(ev)
    assert ev.report["frames_compared"] == 5
    for key in ("expression", "head_pose"):
        assert ch[key]["distance"] == 0.0 and ch[key]["score"] == 1.0
    for key in CURVES:
        assert ch[key]["mae"] == 0.0
        assert ch[key]["pearson"] == pytest.approx(1.0, abs=1e-12)
    assert ch["overall"] == 1.0 and ev.report["overall"] == 1.0
    assert ch["identity"].startswith("not measured")  # MTCNN gives no identity embedding
    assert "RANDOM" in ev.report["expression_encoder"]


def test_shifted_copy_scores_worse_and_another_performer_worse_still(performers):
    biden, biden_f = performers["biden.mp4"]
    trump, trump_f = performers["trump.mp4"]
    n = CLIP - 4
    same = compare([biden.frames(slice(0, n))], [biden.frames(slice(0, n))])
    shifted = compare([biden.frames(slice(0, n))], [biden.frames(slice(2, n + 2))])  # 80 ms later
    other = compare([biden.frames(slice(0, n))], [trump.frames(slice(0, n))])
    s, sh, o = _metrics(same), _metrics(shifted), _metrics(other)
    assert s["overall"] == 1.0 > sh["overall"] > o["overall"]
    for key in CURVES:
        assert s[key]["mae"] == 0 < sh[key]["mae"] < o[key]["mae"], key
        assert sh[key]["pearson"] > o[key]["pearson"], key
    assert sh["mouth_opening"]["pearson"] > 0.5 > o["mouth_opening"]["pearson"]

    # PD-FGC distances (random encoder: only their order is checked).
    k = FEATURE_FRAMES
    shifted_f = _metrics(compare([biden_f.frames(slice(0, k))], [biden_f.frames(slice(2, k + 2))]))
    other_f = _metrics(compare([biden_f.frames(slice(0, k))], [trump_f.frames(slice(0, k))]))
    for key in ("expression", "head_pose"):
        assert 0 < shifted_f[key]["distance"] < other_f[key]["distance"], key
        assert shifted_f[key]["score"] > other_f[key]["score"], key


def test_reversed_clip_gives_negative_mouth_correlation(det):
    frames = _clip("jgz.mp4", JGZ_OPENING.stop)[JGZ_OPENING]
    ev = evaluate(det, [frames], frames[::-1].copy())
    ch = _metrics(ev)
    mouth_driving = ev.series[0]["mouth_opening"][0]
    # The segment really is an opening: the last frames' mouth is far wider than the first ones'.
    assert mouth_driving[-3:].mean() > mouth_driving[:3].mean() + 0.08
    assert ch["mouth_opening"]["pearson"] < -0.3
    assert ch["overall"] < 0.7


def _synthetic_face(mouth_open: float, eye_open: float, size: int = MEASURE_SIZE):
    """A flat skin-coloured face on the alignment template with a dark mouth and eyes of the given
    heights (in inter-ocular distances) and its 5 landmarks."""
    pts = ALIGN_TEMPLATE * size
    iod = np.linalg.norm(pts[1] - pts[0])
    img = np.zeros((size, size, 3), np.uint8)
    img[:] = (205, 160, 135)  # skin
    centre = (pts[3] + pts[4]) / 2
    if mouth_open > 0:
        cv2.ellipse(img, (int(centre[0]), int(centre[1] + mouth_open * iod / 2)),
                    (int(0.6 * iod), round(mouth_open * iod / 2)), 0, 0, 360, (40, 20, 20), -1)
    for x, y in pts[:2]:
        if eye_open > 0:
            cv2.ellipse(img, (int(x), int(y)), (int(0.3 * iod), round(eye_open * iod / 2)), 0, 0, 360, (30, 25, 25), -1)
    return img, pts, iod


def test_crop_measure_reads_the_opening_height():
    """On synthetic faces the crop measure returns the drawn heights (within 3 px of a 106 px
    inter-ocular distance) and 0 for a closed mouth and closed eyes."""
    heights = [0.0, 0.1, 0.2, 0.35]
    faces = [_synthetic_face(h, h / 2) for h in heights]
    crops = np.stack([f[0] for f in faces])
    points = np.stack([f[1] for f in faces])
    iod = faces[0][2]
    eye, mouth = crop_curves(crops, points)
    np.testing.assert_allclose(mouth, heights, atol=3 / iod)
    # Eye window is ±0.10 IOD: openings beyond 0.2 IOD are clipped there.
    np.testing.assert_allclose(eye, np.minimum(np.array(heights) / 2, 0.2), atol=3 / iod)


def test_mesh_curves_are_lid_and_lip_gaps_over_interocular_distance():
    pts5 = np.array([[[100.0, 100], [200, 100], [150, 150], [120, 200], [180, 200]]])
    mesh = np.zeros((1, 468, 2))
    mesh[0, 159], mesh[0, 145] = (100, 95), (100, 105)  # 10 px
    mesh[0, 386], mesh[0, 374] = (200, 96), (200, 102)  # 6 px
    mesh[0, 13], mesh[0, 14] = (150, 195), (150, 225)  # 30 px
    eye, mouth = mesh_curves(mesh, pts5)
    assert eye[0] == pytest.approx(8 / 100) and mouth[0] == pytest.approx(30 / 100)
    assert mouth_width(pts5)[0] == pytest.approx(60 / 100)


def test_metric_definitions_on_hand_made_curves():
    d = np.array([0.1, 0.2, 0.4, 0.3])
    m = curve_metrics(d, 2 * d + 0.05)  # same shape, other scale and offset
    assert m["pearson"] == pytest.approx(1.0)
    assert m["mae"] == pytest.approx(0.3)  # mean of d + 0.05
    assert m["relative"] == pytest.approx(0.3 / 0.1)  # spread: mean |d - 0.25| = 0.1
    assert m["score"] == pytest.approx(1 / (1 + 3.0))
    # deviations (-.15, -.05, .15, .05) vs (.05, .15, -.05, -.15): -0.03 / 0.05
    assert curve_metrics(d, d[::-1])["pearson"] == pytest.approx(-0.6)
    assert curve_metrics(np.ones(4), np.ones(4))["pearson"] is None  # undefined, not 0 or 1
    with pytest.raises(ValueError, match="length"):
        curve_metrics(d, d[:3])

    drv = torch.zeros(3, 554)
    drv[:, 0] = torch.tensor([0.0, 1.0, 2.0])  # head pose moves by 0, 1, 2
    gen = drv.clone()
    gen[:, 1] += 3.0  # 3 off in every frame
    pose = feature_metrics(drv, gen, POSE)
    assert pose["distance"] == pytest.approx(3.0)
    assert pose["relative"] == pytest.approx(3.0 / (2 / 3))  # spread: mean |pose - 1| = 2/3
    assert feature_metrics(drv, gen, EXPRESSION)["distance"] == 0.0

    ch = {"expression": {"score": 0.5}, "head_pose": "not measured", "eye_openness": {"score": 1.0},
          "mouth_opening": {"score": 0.3}, "mouth_width": {"score": 0.2}, "identity": {"cosine_mean": 0.1}}
    assert overall_score(ch) == pytest.approx(np.mean([0.5, 1.0, 0.3, 0.2]))


def test_identity_is_arcface_cosine_to_the_reference_or_not_measured():
    ref = np.array([1.0, 0.0, 0.0])
    gen = np.array([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    m = identity_metrics(ref, gen)
    assert m["cosine_mean"] == pytest.approx((1 + 2 ** -0.5) / 2) and m["cosine_min"] == pytest.approx(2 ** -0.5)
    assert identity_metrics(None, gen).startswith("not measured")
    assert identity_metrics(ref, np.zeros((0, 0))).startswith("not measured")


class _EmbeddingDetector:
    """MTCNN plus a stand-in identity embedding (mean RGB of the face box), to run the identity path
    the insightface backend takes without its model files."""

    def __init__(self, det):
        self.det = det

    def _embed(self, image, faces):
        for f in faces:
            x0, y0, x1, y1 = np.round(f.box).astype(int)
            f.embedding = image[y0:y1, x0:x1].reshape(-1, 3).mean(0)
        return faces

    def detect(self, image):
        return self._embed(image, self.det.detect(image))

    def detect_batch(self, images):
        return [self._embed(im, faces) for im, faces in zip(images, self.det.detect_batch(images))]


def test_identity_is_measured_against_the_reference_when_the_detector_gives_embeddings(det):
    frames = _clip("jgz.mp4", 4)
    ev = evaluate(_EmbeddingDetector(det), [frames], frames.copy(), reference=frames[0])
    ch = _metrics(ev)
    assert ev.report["identity_target"] == "reference image"
    assert ch["identity"]["frames"] == 4 and ch["identity"]["cosine_mean"] > 0.99
    assert ch["overall"] == 1.0


def test_two_characters_are_matched_by_the_generation_assignment(det):
    """two_person.mp4 against itself: the default left-to-right assignment pairs each person with
    themself (perfect scores); face_order 1,0 (as the generation would have used) crosses them."""
    # Half size (640x360, faces ~90 px) and 6 frames: detection on 720p frames is the slow part on CPU.
    frames = np.stack([cv2.resize(f, (640, 360), interpolation=cv2.INTER_AREA) for f in _clip("two_person.mp4", 6)])
    same = evaluate(det, [frames], frames.copy(), people=2)
    assert [c["overall"] for c in same.report["characters"]] == [1.0, 1.0]
    boxes = [c["generated_face_box"] for c in same.report["characters"]]
    assert boxes[0][0] < boxes[1][0]  # character 0 is the left face
    crossed = evaluate(det, [frames], frames.copy(), people=2, face_order=[1, 0])
    assert [c["generated_face_box"] for c in crossed.report["characters"]] == boxes[::-1]
    assert all(c["overall"] < 0.9 for c in crossed.report["characters"])
    with pytest.raises(ValueError, match="face_order"):
        evaluate(det, [frames], frames, people=2, face_order=[0, 1, 2])


def test_bad_inputs_fail_early_with_the_input_named(det):
    frames = _clip("jgz.mp4", 3)
    with pytest.raises(ValueError, match="generated frames must be uint8"):
        evaluate(det, [frames], frames[:0])
    with pytest.raises(ValueError, match="no face was found in any of the 3 generated frames"):
        evaluate(det, [frames], np.full_like(frames, 128))
    with pytest.raises(ValueError, match="people=3 with 2 driving videos"):
        evaluate(det, [frames, frames], frames, people=3)
    with pytest.raises(ValueError, match="landmarks must be one of"):
        evaluate(det, [frames], frames, landmarks="dense")


def test_cli_evaluate_writes_json_and_plot(tmp_path):
    from fantasyportrait_core import cli
    jgz = data_path("jgz.mp4")
    out_json, out_png = tmp_path / "m.json", tmp_path / "m.png"
    rc = cli.main(["evaluate", "--driving", jgz, "--generated", jgz, "--offset", "2", "--frames", "8",
                   "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    report = json.loads(out_json.read_text())
    assert report["frames_compared"] == 8 and report["offset"] == 2
    (ch,) = report["characters"]
    assert ch["expression"].startswith("not measured")  # no --pd-fpg given
    assert 0 < ch["overall"] < 1 and report["overall"] == ch["overall"]
    assert set(CURVES) <= set(ch)
    img = cv2.imread(str(out_png))
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 300
    assert cli.main(["evaluate", "--driving", jgz, "--generated", jgz, "--offset", "100"]) == 2


def test_node_returns_table_plot_and_json(det):
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["FantasyPortraitEvaluate"]
    frames = torch.from_numpy(_clip("jgz.mp4", 6)).float() / 255.0
    scores, plot, js = getattr(cls(), cls.FUNCTION)(face_detector=det, driving=frames, generated=frames.clone(),
                                                     people=1, assignment="left_to_right", face_order="",
                                                     landmarks="crop", driving_fps=15.0, generated_fps=15.0)
    assert "overall 1.000" in scores and "eye_openness" in scores
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3 and 0 <= plot.min() and plot.max() <= 1
    assert json.loads(js)["overall"] == 1.0
    # Driving at twice the generated rate is resampled: every other driving frame is compared.
    _, _, js2 = getattr(cls(), cls.FUNCTION)(face_detector=det, driving=frames, generated=frames[::2].clone(),
                                             people=1, landmarks="crop", driving_fps=30.0, generated_fps=15.0)
    assert json.loads(js2)["overall"] == 1.0 and json.loads(js2)["frames_compared"] == 3


def test_benchmark_runs_tiny():
    import subprocess
    import sys

    from .conftest import ROOT

    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_evaluate.py"), "--video",
                          data_path("jgz.mp4"), "--frames", "3", "--shift", "1", "--min-face-size", "80"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for row in ("driving: align 224² + PD-FGC encode", "generated: eye/mouth curves from the crop",
                "evaluate() end to end", "sum of the stages"):
        assert row in out.stdout, out.stdout

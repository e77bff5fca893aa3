"""Driving side as in training: One-Euro landmark filter, every driver resampled to the output
frame rate, and labels saying which track of which video drives which face."""

import numpy as np
import pytest
import torch

import nodes
from fantasyportrait_core.drive import encode as drive_encode
from fantasyportrait_core.faces.face import Face
from fantasyportrait_core.drive.filters import one_euro_landmarks, smooth_over_time

FACE = np.array([[60, 70], [100, 70], [80, 95], [65, 120], [95, 120]], float)  # eyes, nose, mouth corners


def _track(frames=120, step_at=60, step=24.0, jitter=0.25, seed=0):
    """A still face (160 px wide) with detector jitter, jumping ``step`` px right at ``step_at``."""
    truth = np.repeat(FACE[None], frames, 0)
    truth[step_at:, :, 0] += step
    noisy = truth + np.random.default_rng(seed).normal(0, jitter, truth.shape)
    return truth, noisy, np.full(frames, 160.0)


def test_one_euro_removes_jitter_and_follows_a_step_within_two_frames():
    truth, noisy, size = _track()
    out = one_euro_landmarks(noisy, size)
    still = slice(5, 55)
    jitter = lambda a: np.sqrt((np.diff(a[still], axis=0) ** 2).mean())  # noqa: E731
    error = lambda a: np.sqrt(((a - truth)[still] ** 2).mean())  # noqa: E731
    assert jitter(out) < jitter(noisy) / 3
    assert error(out) < error(noisy) / 2
    # a fast move (0.15 face widths) is followed at once: 90 % of the way within 2 frames...
    progress = (out[:, :, 0] - FACE[None, :, 0]) / 24.0
    lag = next(i for i in range(60, 120) if (progress[i] > 0.9).all()) - 60
    assert lag <= 2
    # ...and never anticipated (causal, unlike the Gaussian)
    assert np.abs(progress[50:60]).max() < 0.05
    gauss = (smooth_over_time(noisy, 1.0)[:, :, 0] - FACE[None, :, 0]) / 24.0
    assert gauss[59].mean() > 0.05


def test_one_euro_first_frame_and_still_points_unchanged():
    lm = np.repeat(FACE[None], 4, 0)
    lm[2] += 0.0  # identical frames: no motion, no division by zero
    out = one_euro_landmarks(lm, np.full(4, 100.0))
    np.testing.assert_array_equal(out, lm)
    with pytest.raises(ValueError, match="face size"):
        one_euro_landmarks(lm, np.zeros(4))


class StampDetector:
    """Reads the time stamp (ms) written into each frame; one fixed face per frame."""

    name = "stamp"

    def __init__(self):
        self.seen = []

    def detect(self, frame):
        self.seen.append(int(frame[0, 0, 0]) + 256 * int(frame[0, 0, 1]))
        return [Face(np.array([8.0, 8, 56, 56]), FACE * 0.3 + 10, 1.0)]


def _stamped(seconds, fps):
    n = int(seconds * fps)
    frames = np.zeros((n, 64, 64, 3), np.uint8)
    ms = np.round(np.arange(n) * 1000 / fps).astype(int)
    frames[:, 0, 0, 0], frames[:, 0, 0, 1] = ms % 256, ms // 256
    return torch.from_numpy(frames).float() / 255.0, 1000 / fps


def test_drivers_at_15_and_30_fps_come_out_frame_aligned_at_25(monkeypatch):
    monkeypatch.setattr(drive_encode, "encode_expressions", lambda enc, crops: torch.zeros(len(crops), 554))
    node = nodes.NODE_CLASS_MAPPINGS["FantasyPortraitEncodeExpression"]()
    encoder = torch.nn.Linear(1, 1)
    out = {}
    for fps in (15.0, 30.0):
        det = StampDetector()
        images, period = _stamped(2.0, fps)
        expr, _, info = node.encode(encoder, det, images, people=1, smooth=0.0, landmark_filter="one_euro",
                                    source_fps=fps, fps=25.0)
        out[fps] = (expr, np.array(det.seen), period, info)
    (a, ta, pa, info_a), (b, tb, pb, _) = out[15.0], out[30.0]
    assert a[0].num_frames == b[0].num_frames == len(ta) == len(tb) == 50  # 2 s at 25 fps each
    assert a[0].fps == b[0].fps == 25.0
    t = np.arange(50) * 40.0  # output frame i shows time i/25 s
    assert np.abs(ta - t).max() <= pa / 2 + 1 and np.abs(tb - t).max() <= pb / 2 + 1
    assert "50 frames at 25 fps (resampled from 30 at 15 fps)" in info_a

    # the Conditioning node passes the common rate on (for Create Video) and refuses a mix
    faces = nodes.portrait.ReferenceFaces([Face(np.array([0.0, 0, 50, 50]), FACE * 0.2, 1.0),
                                           Face(np.array([60.0, 0, 110, 50]), FACE * 0.2 + [60, 0], 1.0)], 120, 60)
    cond = nodes.NODE_CLASS_MAPPINGS["FantasyPortraitConditioning"]()
    portrait, _, fps = cond.condition(faces, a, expression_2=b)
    assert fps == 25.0 and len(portrait.drivers) == 2
    images, _ = _stamped(1.0, 30.0)
    c, _, _ = node.encode(encoder, StampDetector(), images, source_fps=30.0, fps=30.0)
    with pytest.raises(ValueError, match="same fps on every Encode Expression"):
        cond.condition(faces, a, expression_2=c)

    # max_frames: only the first frames at the output rate are detected and encoded (as the reference)
    det = StampDetector()
    images, _ = _stamped(2.0, 15.0)
    short, _, info = node.encode(encoder, det, images, source_fps=15.0, fps=25.0, max_frames=9)
    assert short[0].num_frames == 9 and det.seen == ta[:9].tolist()
    assert "50 frames at 25 fps (resampled from 30 at 15 fps), frames 0..8 encoded" in info


def test_labels_name_the_video_and_track_driving_each_face(monkeypatch):
    """The preview says which track of which video drives which face ('face #1 <- drive3.mp4 #0')."""
    from nodes.portrait import source_name

    prompt = {"1": {"class_type": "LoadVideo", "inputs": {"file": "drive3.mp4"}},
              "2": {"class_type": "GetVideoComponents", "inputs": {"video": ["1", 0]}},
              "3": {"class_type": "FantasyPortraitEncodeExpression", "inputs": {"images": ["2", 0], "people": 2}},
              "4": {"class_type": "VHS_LoadVideo", "inputs": {"video": "sub/talk.webm", "frame_load_cap": 0}},
              "5": {"class_type": "FantasyPortraitEncodeExpression", "inputs": {"images": ["4", 0]}},
              "6": {"class_type": "EmptyImage", "inputs": {"width": 64}},
              "7": {"class_type": "FantasyPortraitEncodeExpression", "inputs": {"images": ["6", 0]}}}
    assert source_name(prompt, "3") == "drive3.mp4"
    assert source_name(prompt, 5) == "talk.webm"
    assert source_name(prompt, "7") is None and source_name(None, "3") is None

    class TwoFaces(StampDetector):
        def detect(self, frame):
            return [Face(np.array([0.0, 0, 40, 40]), FACE * 0.25, 1.0),
                    Face(np.array([70.0, 0, 110, 40]), FACE * 0.25 + [70, 0], 1.0)]

    monkeypatch.setattr(drive_encode, "encode_expressions", lambda enc, crops: torch.zeros(len(crops), 554))
    images = torch.zeros(5, 64, 128, 3)
    enc = nodes.NODE_CLASS_MAPPINGS["FantasyPortraitEncodeExpression"]()
    expr, _, info = enc.encode(torch.nn.Linear(1, 1), TwoFaces(), images, people=2, prompt=prompt, unique_id="3")
    assert [d.label for d in expr] == ["drive3.mp4 #0", "drive3.mp4 #1"]
    assert info.splitlines()[0].startswith("detector: ")  # which backend ran
    assert info.splitlines()[2].startswith("drive3.mp4 #1: 5 frames at 25 fps")

    labels = []
    monkeypatch.setattr(nodes.portrait, "draw_faces", lambda img, faces, **kw: labels.extend(kw["labels"]) or img)
    faces = nodes.portrait.ReferenceFaces([Face(np.array([0.0, 0, 50, 50]), FACE * 0.2, 1.0),
                                           Face(np.array([60.0, 0, 110, 50]), FACE * 0.2 + [60, 0], 1.0)], 120, 60)
    nodes.NODE_CLASS_MAPPINGS["FantasyPortraitConditioning"]().condition(faces, expr, face_order="1,0")
    assert labels == ["face #1 <- drive3.mp4 #0", "face #0 <- drive3.mp4 #1"]

import numpy as np
import pytest
import torch

from fantasyportrait_core.model.expression import ALIGN_TEMPLATE, FanEncoder, align_face, encode_expressions, umeyama
from fantasyportrait_core.faces.face import Face, FaceTrack, fill_missing, track_faces
from fantasyportrait_core.faces.regions import (expand_box, latent_person_map, motion_range, pool_to_tokens,
                                        token_person_ids)
from fantasyportrait_core.media.video import read_image, read_video

from .conftest import data_path


def test_umeyama_recovers_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, t = 0.3, 1.7, np.array([12.0, -4.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rot.T + t
    m = umeyama(src, dst)
    np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], t, atol=1e-9)
    with pytest.raises(ValueError, match="degenerate"):
        umeyama(np.ones((5, 2)), dst)


def test_align_face_puts_landmarks_on_template():
    img = np.zeros((300, 300, 3), np.uint8)
    lm = np.array([[100, 120], [160, 118], [131, 150], [108, 180], [155, 179]], float)
    for i, (x, y) in enumerate(lm):
        img[int(y) - 1:int(y) + 2, int(x) - 1:int(x) + 2] = 50 * (i + 1)
    crop = align_face(img, lm)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    m = umeyama(lm, ALIGN_TEMPLATE * 224)
    mapped = lm @ m[:, :2].T + m[:, 2]
    assert np.abs(mapped - ALIGN_TEMPLATE * 224).max() < 6  # 5 points, similarity fit
    for i, (x, y) in enumerate(np.round(mapped).astype(int)):
        assert crop[y - 2:y + 3, x - 2:x + 3].max() > 0, f"landmark {i} moved off its template spot"


def test_fan_encoder_batch_independent():
    enc = FanEncoder().eval()
    crops = np.random.default_rng(0).integers(0, 255, (3, 224, 224, 3), dtype=np.uint8)
    a = encode_expressions(enc, crops, batch_size=3)
    b = encode_expressions(enc, crops, batch_size=1)
    assert a.shape == (3, 554)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        encode_expressions(enc, np.zeros((2, 100, 100, 3), np.uint8))


def _face(x, y, s=20.0):
    box = np.array([x, y, x + s, y + s])
    return Face(box, np.tile(box[:2] + s / 2, (5, 1)), 0.9)


def test_track_faces_ids_gaps_and_order():
    # person A moves right slowly on the left, person B on the right; B missing in frames 2-3
    frames = []
    for i in range(6):
        faces = [_face(10 + i, 10)]
        if i not in (2, 3):
            faces.append(_face(100, 12))
        frames.append(faces[::-1] if i % 2 else faces)  # detection order must not matter
    tracks = track_faces(frames, max_people=2)
    assert len(tracks) == 2
    a, b = tracks
    assert a.boxes[0, 0] < b.boxes[0, 0], "tracks come left to right"
    assert a.missing == [] and b.missing == [2, 3]
    assert len(b) == 6 and np.allclose(b.boxes[2], b.boxes[1])
    np.testing.assert_allclose(a.boxes[:, 0], 10 + np.arange(6))
    with pytest.raises(ValueError, match="no face"):
        track_faces([[], []])


def test_fill_missing_interpolates():
    v = np.array([[0.0], [0], [4], [0], [8], [0]])
    det = np.array([False, False, True, False, True, False])
    np.testing.assert_allclose(fill_missing(v, det)[:, 0], [4, 4, 4, 6, 8, 8])


def test_motion_range_and_expand_box():
    boxes = np.array([[100, 100, 200, 200], [90, 100, 200, 260], [100, 100, 210, 200]], float)
    r = motion_range(boxes)
    np.testing.assert_allclose(r, [0.1, 0.1, 0.0, 0.25])  # down 0.6 capped at 0.25
    assert expand_box([100, 100, 200, 200], r, 1000, 1000).tolist() == [90, 100, 210, 225]
    assert expand_box([0, 0, 50, 50], [1, 1, 1, 1], 60, 60).tolist() == [0, 0, 60, 60]


def test_token_pooling_groups_frames_like_the_vae():
    masks = torch.zeros(1, 9, 32, 48, dtype=torch.bool)
    masks[0, 5, 0:4, 16:20] = True  # only pixel frame 5 -> latent frame 2 (frames 5..8)
    tok = pool_to_tokens(masks, 9)
    assert tok.shape == (1, 3, 2, 3)
    assert tok[0, 2, 0, 1] and tok.sum() == 1
    masks[0, 0, 20, 40] = True  # frame 0 -> latent frame 0 alone
    assert pool_to_tokens(masks, 9)[0, 0, 1, 2]


def test_overlap_goes_to_nearest_face_and_background_is_zero():
    m = torch.zeros(2, 1, 4, 6, dtype=torch.bool)
    m[0, :, :, 0:4] = True
    m[1, :, :, 2:6] = True
    ids = latent_person_map(m, centers=np.array([[16.0, 32.0], [80.0, 32.0]]))  # token x centres 1 and 5
    row = ids.view(1, 4, 6)[0, 0].tolist()
    assert row == [1, 1, 1, 2, 2, 2]
    m2 = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    m2[0, 0, 0, 0] = True
    assert latent_person_map(m2, np.array([[8.0, 8.0]])).tolist() == [[1, 0, 0, 0]]
    assert token_person_ids(3, 2).tolist() == [1, 1, 2, 2, 3, 3]


# ------------------------------------------------------------------ real detector on shared inputs

def test_detects_one_face_in_man(detector):
    faces = detector.detect(read_image(data_path("man.jpeg")))
    assert len(faces) == 1
    f = faces[0]
    lm = f.landmarks
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # image-left before image-right
    assert lm[0, 1] < lm[2, 1] < lm[3, 1]  # eyes above nose above mouth
    assert (f.box[0] <= lm[:, 0]).all() and (lm[:, 0] <= f.box[2]).all()


def test_detects_two_faces_left_to_right(detector):
    faces = detector.detect(read_image(data_path("two_person.png")))
    assert len(faces) == 2
    assert faces[0].center[0] < faces[1].center[0]


def test_driving_video_gives_full_length_track(detector, tiny):
    from fantasyportrait_core.drive.encode import encode_driving

    video = read_video(data_path("jgz.mp4"), max_frames=9)
    (drv,) = encode_driving(detector, tiny[3], video.frames, people=1)
    assert drv.features.shape == (9, 554)
    assert drv.crops.shape == (9, 224, 224, 3)
    assert isinstance(drv.track, FaceTrack) and len(drv.track) == 9

"""Directing a performance (fantasyportrait_core.drive.direction) and saved performances
(fantasyportrait_core.drive.performance): per-channel strength, keyframes, relative motion, the portrait's
baseline, save/load, trim/loop/retime, and the one-line errors."""

import copy

import numpy as np
import pytest
import torch

from fantasyportrait_core.drive import encode as drive_encode
from fantasyportrait_core.sampling import generate
from fantasyportrait_core.drive.condition import portrait_condition
from fantasyportrait_core.model.adapter import TOKENS_PER_FRAME
from fantasyportrait_core.model.attention import attach_portrait_processors
from fantasyportrait_core.model.denoiser import I2VConditioning
from fantasyportrait_core.drive.direction import (CHANNEL_SLICES, CHANNEL_TOKENS, CHANNELS, Direction, Strength,
                                            baseline_features, direct, directions_from_args, parse_keys)
from fantasyportrait_core.faces.face import Face, FaceTrack
from fantasyportrait_core.drive.performance import (load_performance, performance_paths, retime, retime_indices,
                                              save_performance)
from fantasyportrait_core.validate import InputError

F = 9


def _driver(frames=F, seed=0, fps=25.0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(frames, 554, generator=g)
    boxes = np.array([[20.0 + i, 16.0, 44.0 + i, 44.0] for i in range(frames)])
    lm = np.tile(np.array([[27, 26], [37, 26], [32, 32], [28, 38], [36, 38]], dtype=float), (frames, 1, 1))
    detected = np.ones(frames, bool)
    detected[[i for i in (2, 5) if i < frames]] = False
    return drive_encode.DrivingExpression(feats, FaceTrack(boxes, lm, detected), source="/videos/take3.mp4",
                                          track_index=1, fps=fps, people_seen=2)


def _baseline(seed=7):
    return torch.randn(554, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# Strength, keyframes, channels


def test_column_and_token_layout_matches_the_adapter():
    """Channel columns tile the 554 features in the adapter's order; channel tokens tile the 24 per frame."""
    cols = np.concatenate([np.arange(554)[CHANNEL_SLICES[c]] for c in CHANNELS])
    assert np.array_equal(cols, np.arange(554))
    assert [CHANNEL_SLICES[c].stop - CHANNEL_SLICES[c].start for c in CHANNELS] == [6, 6, 30, 512]
    assert sorted(sum(CHANNEL_TOKENS.values(), ())) == list(range(TOKENS_PER_FRAME))


def test_s_one_keeps_features_bit_for_bit_and_s_zero_gives_the_baseline():
    d, b = _driver(), _baseline()
    ones = Direction({c: Strength.constant(1.0) for c in CHANNELS})
    assert ones.apply(d.features, b) is d.features and direct(d, ones, b) is d
    zeros = Direction({c: Strength.constant(0.0) for c in CHANNELS})
    out = zeros.apply(d.features, b)
    assert torch.equal(out, b.expand(F, -1))  # every frame is exactly the portrait's own features
    # one channel at 0.5 goes through the arithmetic; every other channel stays the driver's, bit for bit
    half = Direction({"head_pose": Strength.constant(0.5)}).apply(d.features, b)
    assert torch.equal(half[:, 6:], d.features[:, 6:])
    torch.testing.assert_close(half[:, :6], b[:6] + 0.5 * (d.features[:, :6] - b[:6]))


@pytest.mark.parametrize("channel", CHANNELS)
def test_each_channel_changes_only_its_features_and_only_the_tokens_it_feeds(channel, tiny):
    _, adapter, _, _ = tiny
    d, b = _driver(), _baseline()
    edited = Direction({channel: Strength.constant(1.7)}).apply(d.features, b)
    changed = (edited != d.features).any(0)
    cols = torch.zeros(554, dtype=torch.bool)
    cols[CHANNEL_SLICES[channel]] = True
    assert torch.equal(changed, cols)
    torch.testing.assert_close(edited[:, cols], b[cols] + 1.7 * (d.features[:, cols] - b[cols]))
    with torch.no_grad():
        t0 = adapter.expression_tokens(d.features[None]).view(F, TOKENS_PER_FRAME, -1)
        t1 = adapter.expression_tokens(edited[None]).view(F, TOKENS_PER_FRAME, -1)
    moved = (t0 != t1).any(-1).any(0)  # [24] per-frame token positions that changed
    assert sorted(torch.nonzero(moved).flatten().tolist()) == sorted(CHANNEL_TOKENS[channel])


def test_keyframes_interpolate_at_and_between_keys():
    s = parse_keys("0:1, 4:0.2, 8:2")
    assert s.keys == ((0, 1.0), (4, 0.2), (8, 2.0))
    v = s.values(11)
    expected = [1.0, 0.8, 0.6, 0.4, 0.2, 0.65, 1.1, 1.55, 2.0, 2.0, 2.0]  # held after the last key
    torch.testing.assert_close(v, torch.tensor(expected), rtol=0, atol=1e-6)
    assert parse_keys("3:0.5, 6:1").values(8)[:3].tolist() == [0.5] * 3  # held before the first key
    d, b = _driver(), _baseline()
    out = Direction({"mouth": s}).apply(d.features, b)
    m = CHANNEL_SLICES["mouth"]
    assert torch.equal(out[0, m], d.features[0, m])  # s = 1 exactly at the key: the driver, bit for bit
    assert torch.equal(out[:, :42], d.features[:, :42])
    for f in (2, 4, 6):
        torch.testing.assert_close(out[f, m], b[m] + float(expected[f]) * (d.features[f, m] - b[m]))


def test_relative_motion_gives_the_baseline_at_the_neutral_frame():
    d, b = _driver(), _baseline()
    for neutral in (0, 5):
        out = Direction({"mouth": Strength.constant(1.5)}, "relative", neutral).apply(d.features, b)
        assert torch.equal(out[neutral], b)
        torch.testing.assert_close(out[3], b + torch.cat([torch.ones(42), torch.full((512,), 1.5)])
                                   * (d.features[3] - d.features[neutral]))


def test_cli_specs_address_characters():
    ds = directions_from_args(2, ["head_pose=0", "1:mouth=1.5,eyes=0.5"], ["0:emotion=0:1,4:0"], ["1:relative"],
                              ["1:3"])
    assert ds[0].strength("head_pose").keys == ((0, 0.0),) and ds[0].strength("mouth").is_one
    assert ds[0].strength("emotion").keys == ((0, 1.0), (4, 0.0)) and ds[0].motion == "absolute"
    assert ds[1].strength("head_pose").keys == ((0, 0.0),) and ds[1].strength("mouth").keys == ((0, 1.5),)
    assert ds[1].strength("eyes").keys == ((0, 0.5),) and ds[1].strength("emotion").is_one
    assert (ds[1].motion, ds[1].neutral_frame) == ("relative", 3)


@pytest.mark.parametrize("kwargs, words", [
    (dict(strength=["nose=1"]), ["--strength", "unknown channel 'nose'", "head_pose, eyes, emotion, mouth"]),
    (dict(strength=["mouth=2.5"]), ["--strength", "between 0 and 2, got 2.5", "1 follows the driver"]),
    (dict(strength=["mouth=-0.1"]), ["between 0 and 2, got -0.1"]),
    (dict(strength=["mouth=nan"]), ["strength must be a finite number"]),
    (dict(strength=["mouth"]), ["not CHANNEL=S"]),
    (dict(strength_keys=["mouth=0:1,40:0.3,20:1"]), ["--strength-keys", "must increase"]),
    (dict(strength_keys=["mouth=0:1,4:3"]), ["between 0 and 2, got 3"]),
    (dict(strength_keys=["mouth=0:1,x:3"]), ["not FRAME:S"]),
    (dict(strength=["2:mouth=1"]), ["character 2", "fix the 'C:' prefix"]),
    (dict(motion=["sideways"]), ["--motion", "absolute or relative"]),
    (dict(neutral_frame=["-2"]), ["--neutral-frame"]),
])
def test_bad_direction_specs_are_one_line_errors(kwargs, words):
    with pytest.raises(InputError) as e:
        directions_from_args(2, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_keys_or_neutral_frame_outside_the_video_are_errors():
    d = _driver()
    with pytest.raises(InputError, match="key at frame 40 is outside"):
        Direction({"mouth": parse_keys("0:1,40:0.3")}).apply(d.features, _baseline())
    with pytest.raises(InputError, match="neutral frame 12 is outside"):
        Direction({}, "relative", 12).check(F)


# ------------------------------------------------------------------------------------------------
# Baseline


def test_baseline_is_the_encoding_of_the_face_aligned_as_drivers_are(tiny):
    """The baseline equals encode_driving's features for a still video of the same image (the driver
    path: detection stand-in, One-Euro, alignment, encoder)."""
    _, _, _, encoder = tiny
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
    face = Face(np.array([24.0, 20.0, 72.0, 80.0]),
                np.array([[38, 40], [58, 40], [48, 52], [40, 64], [56, 64]], dtype=float), 0.99)

    class Still:
        def detect(self, img):
            return [copy.deepcopy(face)]

    base = baseline_features(encoder, image, [face])
    drivers = drive_encode.encode_driving(Still(), encoder, np.stack([image] * 3))
    assert base.shape == (1, 554)
    torch.testing.assert_close(base[0], drivers[0].features[0], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Saved performances


def test_saved_performance_round_trips_with_its_metadata(tmp_path):
    d = _driver()
    path = save_performance(str(tmp_path / "take.safetensors"), d)
    back = load_performance(path)
    assert torch.equal(back.features, d.features)
    assert back.track.missing == [2, 5] and np.array_equal(back.track.boxes, d.track.boxes)
    assert (back.fps, back.source, back.track_index, back.people_seen) == (25.0, "take3.mp4", 1, 2)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("mouth").shape == (F, 512) and f.get_tensor("head_pose").shape == (F, 6)
    assert meta["format"] == "fantasyportrait.performance" and meta["frames_without_face"] == "[2, 5]"
    assert performance_paths("out/take.safetensors", 3) == ["out/take.safetensors", "out/take_1.safetensors",
                                                            "out/take_2.safetensors"]


def test_files_that_are_not_performances_are_one_line_errors(tmp_path):
    from safetensors.torch import save_file

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    other = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    bad_width = tmp_path / "bad.safetensors"
    path = save_performance(str(tmp_path / "ok.safetensors"), _driver())
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    t["mouth"] = t["mouth"][:, :500].contiguous()
    save_file(t, str(bad_width), metadata=meta)
    for p, words in [(junk, "unreadable as safetensors"), (other, "not a saved FantasyPortrait performance"),
                     (bad_width, "channel mouth"), (tmp_path / "none.safetensors", "not found")]:
        with pytest.raises(InputError, match=words) as e:
            load_performance(str(p), "--expression")
        assert "\n" not in str(e.value) and "--expression" in str(e.value)
    with pytest.raises(InputError, match="must end in .safetensors"):
        save_performance(str(tmp_path / "take.pt"), _driver())


def test_trim_loop_and_retime_give_the_stated_frames_in_order():
    # speed 2 at the same rate: every second frame
    assert retime_indices(10, 25, 25, speed=2).tolist() == [0, 2, 4, 6, 8]
    # half speed: each frame shown twice (nearest frame in time, as drivers are resampled)
    assert retime_indices(4, 25, 25, speed=0.5).tolist() == [0, 1, 1, 2, 2, 3, 3, 3]
    # a 50 fps performance at 25 fps output
    assert retime_indices(6, 50, 25).tolist() == [0, 2, 4]
    # trim then loop
    assert retime_indices(10, 25, 25, start=2, end=5, frames=8, loop="repeat").tolist() == [2, 3, 4, 2, 3, 4, 2, 3]
    assert retime_indices(10, 25, 25, start=2, end=5, frames=8, loop="pingpong").tolist() == [2, 3, 4, 3, 2, 3, 4, 3]
    assert retime_indices(10, 25, 25, frames=4).tolist() == [0, 1, 2, 3]  # longer than asked: cut
    with pytest.raises(InputError, match="has 3 frames .* but 8 were asked; set loop"):
        retime_indices(10, 25, 25, start=2, end=5, frames=8)
    with pytest.raises(InputError, match="end frame 12"):
        retime_indices(10, 25, 25, end=12)
    with pytest.raises(InputError, match="start frame 10"):
        retime_indices(10, 25, 25, start=10)
    d = _driver(10)
    r = retime(d, speed=2.0, frames=9, loop="repeat")
    order = [0, 2, 4, 6, 8, 0, 2, 4, 6]
    assert torch.equal(r.features, d.features[order]) and np.array_equal(r.track.boxes, d.track.boxes[order])
    assert r.track.missing == [1, 6]  # frame 2 (no face) sits at 1 and 6; frame 5 is skipped
    assert r.num_frames == 9 and r.fps == 25.0
    assert retime(d) is d


def _latent(tiny, drivers, frames=5, steps=2):
    transformer, adapter, _, _ = tiny
    model = copy.deepcopy(transformer)
    state = attach_portrait_processors(model, adapter)
    g = torch.Generator().manual_seed(3)
    c = model.config
    f_lat, h, w = (frames - 1) // 4 + 1, 2, 2
    y = torch.cat([torch.zeros(1, 4, f_lat, h, w), torch.randn(1, 16, f_lat, h, w, generator=g)], 1)
    y[:, :4, 0] = 1
    cond = I2VConditioning(torch.randn(1, 8, c.text_dim, generator=g), None,
                           torch.randn(1, 257, c.image_dim, generator=g), y)
    portrait = portrait_condition(adapter, drivers, frames, None)
    return generate.generate_latent(model, state, cond, portrait, frames, w * 8, h * 8, steps=steps, seed=1)


def test_saved_and_reloaded_performance_gives_the_identical_latent(tiny, tmp_path):
    d = _driver(5)
    back = load_performance(save_performance(str(tmp_path / "p.safetensors"), d))
    a, b = _latent(tiny, [d]), _latent(tiny, [back])
    assert torch.equal(a, b)
    held = direct(d, Direction({"head_pose": Strength.constant(0.0), "mouth": Strength.constant(2.0)}), _baseline())
    assert not torch.equal(_latent(tiny, [held]), a)  # the direction reaches the latent

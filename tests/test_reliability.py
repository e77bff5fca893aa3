"""Bad input, long clips and faults (issue #13): every user mistake fails early with one line that
names the input; driving videos are streamed; results are never lost; faces are numbered in
reading order; a generation leaves the model as it found it. Each test is a row of
docs/RELIABILITY.md."""

import copy
import json
import os

import numpy as np
import pytest
import torch

from fantasyportrait_core import cli

from fantasyportrait_core.runtime import runner
from fantasyportrait_core.drive import encode as drive_encode
from fantasyportrait_core.sampling import generate
from fantasyportrait_core.faces.assign import assign_faces, detect_reference
from fantasyportrait_core.faces.face import Face, reading_order
from fantasyportrait_core.validate import InputError
from fantasyportrait_core.media.video import (VideoStream, load_frames, probe_video, read_video, resample_fps, save_video,
                                        write_video)

from .conftest import data_path


@pytest.fixture
def no_models(monkeypatch):
    """Fail loudly if a model is built: the error must come before."""
    def forbidden(*a, **k):
        raise AssertionError("a model was built before the input was checked")

    monkeypatch.setattr(runner, "tiny_random_models", forbidden)
    monkeypatch.setattr(runner, "real_models", forbidden)


@pytest.fixture
def fast_models(monkeypatch, tiny):
    """The session's tiny models (copies) instead of building new ones."""
    transformer, adapter, vae, encoder = tiny
    monkeypatch.setattr(runner, "tiny_random_models",
                        lambda seed=0: runner.Models(copy.deepcopy(transformer), copy.deepcopy(adapter), vae, encoder,
                                                  random=True))


def _run(tmp_path, *extra, image="two_person.png", driving=("biden.mp4", "trump.mp4"), out="o.mp4"):
    args = ["run", "--tiny-random", "--image", data_path(image), "--driving", *[data_path(d) for d in driving],
            "--out", str(tmp_path / out) if out else "", "--frames", "1", "--max-size", "128", "--steps", "1",
            "--device", "cpu", *extra]
    return cli.main(args)


CLI_ERRORS = [
    (["--steps", "0"], "--steps must be between 1 and 1000, got 0"),
    (["--frames", "0"], "--frames must be between 1"),
    (["--frames", "-5"], "--frames must be between 1 and 100000, got -5"),
    (["--max-size", "0"], "--max-size must be between 64"),
    (["--fps", "-5"], "--fps must be above 0"),
    (["--fps", "nan"], "--fps must be a finite number"),
    (["--context-frames", "0"], "--context-frames must be between 5"),
    (["--context-overlap", "81"], "--context-overlap must be between 0 and 80"),
    (["--cfg", "inf"], "--cfg must be a finite number"),
    (["--shift", "0"], "--shift must be above 0"),
    (["--face-order", "a,b"], "--face-order 'a,b' must be comma-separated face numbers"),
    (["--face-order", "1,1"], "--face-order '1,1' names a face twice"),
    (["--face-order", "0"], "--face-order lists 1 face(s) for 2 character(s)"),
    (["--face-order=-1,0"], "face numbers start at 0"),
    (["--people", "1", "1", "1"], "--people has 3 numbers for 2 driving videos"),
    (["--people", "0"], "--people must be between 1 and 8"),
    (["--assign", "identity"], "--assign identity needs identity embeddings"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "bogus"], "--device"),
    (["--detector", "official", "--detector-dir", "/nonexistent"], "--detector-dir '/nonexistent' is not a folder"),
    (["--adapter", "/nonexistent.ckpt"], "--tiny-random builds a random model and would ignore --adapter"),
    (["--init-video", "/nonexistent.mp4"], "--init-video '/nonexistent.mp4' not found"),
    (["--sigmas", "1,half,0"], "--sigmas '1,half,0' must be comma-separated numbers"),
]


@pytest.mark.parametrize("extra, message", CLI_ERRORS, ids=[" ".join(e) for e, _ in CLI_ERRORS])
def test_cli_rejects_bad_options_before_any_model_or_frame(tmp_path, capsys, no_models, extra, message):
    assert _run(tmp_path, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == [], "nothing may be written for a rejected run"


@pytest.mark.parametrize("out, message", [
    ("dir", "is an existing folder; give a file name inside it"),
    ("x.gif", "cannot write a '.gif' file; the output is H.264 video, use one of .mp4, .mov, .mkv"),
    ("noext", "cannot write a 'extensionless' file"),
    ("", "--out is empty"),
    ("afile/x.mp4", "is a file, not a folder"),
])
def test_cli_checks_the_output_path_first(tmp_path, capsys, no_models, out, message):
    (tmp_path / "dir").mkdir()
    (tmp_path / "afile").write_text("")
    before = sorted(os.listdir(tmp_path))
    assert _run(tmp_path, out=out) == 2
    assert message in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before and os.listdir(tmp_path / "dir") == []


def test_cli_checks_checkpoint_paths_first(tmp_path, capsys, no_models):
    base = ["run", "--image", data_path("man.jpeg"), "--driving", data_path("jgz.mp4"), "--out", str(tmp_path / "o.mp4")]
    assert cli.main(base + ["--adapter", str(tmp_path / "a.ckpt")]) == 2
    assert "real-model mode needs --wan-dir" in capsys.readouterr().err
    (tmp_path / "wan" / "vae").mkdir(parents=True)
    assert cli.main(base + ["--wan-dir", str(tmp_path / "wan"), "--adapter", str(tmp_path / "a.ckpt")]) == 2
    assert f"--adapter '{tmp_path / 'a.ckpt'}' not found" in capsys.readouterr().err
    (tmp_path / "a.ckpt").write_bytes(b"x")
    assert cli.main(base + ["--wan-dir", str(tmp_path / "wan"), "--adapter", str(tmp_path / "a.ckpt")]) == 2
    assert "holding transformer/ (or give --transformer)" in capsys.readouterr().err


def test_cli_refuses_to_overwrite_an_input(tmp_path, capsys, no_models):
    video = tmp_path / "drive.mp4"
    video.write_bytes(open(data_path("jgz.mp4"), "rb").read())
    rc = cli.main(["run", "--tiny-random", "--image", data_path("man.jpeg"), "--driving", str(video),
                   "--out", str(video)])
    assert rc == 2 and "is also a driving video" in capsys.readouterr().err
    assert video.stat().st_size > 0


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "not found"),
    (lambda p: p.write_bytes(b""), "is an empty file"),
    (lambda p: p.write_bytes(b"not a video at all" * 10), "cannot be opened as a video"),
])
def test_cli_names_a_bad_driving_video(tmp_path, capsys, no_models, make, message):
    bad = tmp_path / "bad.mp4"
    make(bad)
    rc = cli.main(["run", "--tiny-random", "--image", data_path("man.jpeg"), "--driving", data_path("jgz.mp4"),
                   str(bad), "--out", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "bad.mp4" in err


def test_cli_refuses_tiny_and_non_images(tmp_path, capsys, no_models):
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "tiny.png")
    (tmp_path / "text.png").write_text("hello")
    for name, message in (("tiny.png", "is 16x16; a face cannot be found"), ("text.png", "is not an image")):
        rc = cli.main(["run", "--tiny-random", "--image", str(tmp_path / name), "--driving", data_path("jgz.mp4"),
                       "--out", str(tmp_path / "o.mp4")])
        assert rc == 2 and message in capsys.readouterr().err


def test_face_order_and_counts_fail_before_driving_frames(tmp_path, capsys, fast_models, monkeypatch):
    """Face count and face order need the reference faces (one image); the driving videos are
    never touched."""
    monkeypatch.setattr(drive_encode, "encode_driving",
                        lambda *a, **k: pytest.fail("driving video encoded before the check"))
    assert _run(tmp_path, "--face-order", "0,5") == 2
    assert "--face-order uses face 5 but the reference image has 2 face(s)" in capsys.readouterr().err
    assert _run(tmp_path, "--people", "2") == 2
    assert "shows 2 face(s) but 4 driving expression" in capsys.readouterr().err


def test_faceless_driving_video_is_named(tmp_path, capsys, fast_models):
    blank = tmp_path / "blank.mp4"
    write_video(str(blank), np.full((6, 96, 96, 3), 128, np.uint8), 25.0)
    rc = cli.main(["run", "--tiny-random", "--image", data_path("two_person.png"), "--driving", data_path("biden.mp4"),
                   str(blank), "--out", str(tmp_path / "o.mp4"), "--frames", "5", "--max-size", "96", "--steps", "1",
                   "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{blank}: no face was found in any of its 5 frame(s)" in err


def test_one_video_of_two_people_says_what_it_used(tmp_path, capsys, fast_models, caplog):
    """No silent fallback: the report and the log say the video shows 2 people and 1 was used, and
    which reference face got no driver; the preview numbers are the face numbers."""
    assert _run(tmp_path, driving=("two_person.mp4",)) == 0
    captured = capsys.readouterr()
    text = captured.out
    for bar in ("faces in two_person.mp4", "expressions in two_person.mp4", "sampling"):  # progress on stderr
        assert bar in captured.err
    report = json.loads(text[text.index("{"):])
    assert report["characters"][0]["people_in_video"] == 2
    assert report["notes"] == ["two_person.mp4 shows 2 people; 1 animated (--people)"]
    assert report["unused_faces"] == [0] and report["characters"][0]["face"] == 1  # the larger face
    assert "shows 2 people; animating the 1 most present" in caplog.text
    assert "face(s) #0 have no driver" in caplog.text


def test_face_order_numbers_are_the_preview_numbers(tmp_path, capsys, fast_models):
    assert _run(tmp_path, "--face-order", "1,0") == 0
    text = capsys.readouterr().out
    report = json.loads(text[text.index("{"):])
    faces = report["reference_faces"]
    assert [f["face"] for f in faces] == [0, 1] and faces[0]["box"][0] < faces[1]["box"][0]
    assert [(c["character"], c["face"], c["video"]) for c in report["characters"]] == \
        [(0, 1, "biden.mp4"), (1, 0, "trump.mp4")]
    assert report["unused_faces"] == []


def test_unwritable_result_is_kept_and_can_be_encoded(tmp_path, capsys, fast_models, monkeypatch):
    """The final write fails (disk full, say): the frames go to a .frames.npz beside it, the message
    says where and how to encode it, and no partial file is left."""
    import fantasyportrait_core.media.video as V

    real_write = V.write_video

    def full_disk(path, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(V, "write_video", full_disk)
    assert _run(tmp_path, image="man.jpeg", driving=("jgz.mp4",), out="gen.mp4") == 1
    err = capsys.readouterr().err
    kept = tmp_path / "gen.frames.npz"
    assert f"could not write {tmp_path / 'gen.mp4'}" in err and str(kept) in err and "cli encode" in err
    assert sorted(os.listdir(tmp_path)) == ["gen.frames.npz", "gen_faces.png"]
    frames, fps = load_frames(str(kept))
    assert frames.shape == (1, 128, 128, 3) and frames.dtype == np.uint8 and fps == pytest.approx(25.0)  # drivers resampled to 25 fps
    monkeypatch.setattr(V, "write_video", real_write)
    assert cli.main(["encode", str(kept), "--out", str(tmp_path / "again.mkv")]) == 0
    assert probe_video(str(tmp_path / "again.mkv"))["frames"] == 1


def test_broken_audio_costs_the_sound_not_the_video(tmp_path, monkeypatch, caplog):
    import fantasyportrait_core.media.video as V

    real_write = V.write_video
    calls = []

    def no_audio(path, frames, fps, audio_from=None, **k):
        calls.append(audio_from)
        if audio_from is not None:
            raise ValueError("corrupt audio packet")
        return real_write(path, frames, fps)

    monkeypatch.setattr(V, "write_video", no_audio)
    frames = np.zeros((5, 32, 32, 3), np.uint8)
    res = save_video(str(tmp_path / "v.mp4"), frames, 25.0, audio_from=data_path("jgz.mp4"))
    assert res.path == str(tmp_path / "v.mp4") and res.audio is False and res.fallback is None
    assert calls == [data_path("jgz.mp4"), None] and "could not be copied" in caplog.text


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    import av

    (tmp_path / "out.mp4").write_bytes(b"previous result")

    def boom(*a, **k):
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", boom)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        write_video(str(tmp_path / "out.mp4"), np.zeros((3, 16, 16, 3), np.uint8), 25.0)
    assert os.listdir(tmp_path) == ["out.mp4"] and (tmp_path / "out.mp4").read_bytes() == b"previous result"


def test_written_container_follows_the_extension(tmp_path):
    import av

    for ext, fmt in ((".mp4", "mp4"), (".mkv", "matroska"), (".mov", "mov")):
        p = write_video(str(tmp_path / f"x{ext}"), np.zeros((3, 16, 16, 3), np.uint8), 10.0)
        with av.open(p) as c:
            assert fmt in c.format.name


# ----------------------------------------------------------------------------------------------
# Streaming


class _CountingOpen:
    """Wraps av.open so tests can count the frames a reader decodes."""

    def __init__(self, real):
        self.real, self.decoded = real, 0

    def __call__(self, *a, **k):
        container = self.real(*a, **k)
        counter = self

        class Proxy:
            def __getattr__(self, name):
                return getattr(container, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                container.close()

            def decode(self, *args, **kw):
                for f in container.decode(*args, **kw):
                    counter.decoded += 1
                    yield f

        return Proxy()


def test_stream_decodes_only_the_frames_it_yields(monkeypatch):
    import av

    counting = _CountingOpen(av.open)
    monkeypatch.setattr(av, "open", counting)
    stream = VideoStream(data_path("biden.mp4"), fps=12.5, max_frames=5)  # 25 fps source: every other frame
    frames = list(stream)
    assert len(frames) == 5 and counting.decoded == 9  # source frames 0, 2, 4, 6, 8
    full = read_video(data_path("biden.mp4"), max_frames=10)
    np.testing.assert_array_equal(np.stack(frames), resample_fps(full, 12.5).frames[:5])
    assert list(VideoStream(data_path("biden.mp4"), max_frames=0)) == []


def test_encode_driving_streams_a_video(detector, tiny):
    """A VideoStream gives the same expressions as the frames in memory (two passes, same frames)."""
    stream = VideoStream(data_path("jgz.mp4"), max_frames=3)
    from_stream = drive_encode.encode_driving(detector, tiny[3], stream, source="jgz")
    in_memory = drive_encode.encode_driving(detector, tiny[3], stream.read().frames)
    assert from_stream[0].num_frames == 3 and from_stream[0].source == "jgz"
    torch.testing.assert_close(from_stream[0].features, in_memory[0].features)


# ----------------------------------------------------------------------------------------------
# Reading order


def _box(cx, cy, size=40):
    return [cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2]


def test_reading_order_grid_rows_then_left_to_right():
    # a 2x2 group whose bottom-left face sits a little left of the top-left one: left-to-right by x
    # alone would zig-zag TL, BL, TR, BR
    tl, tr, bl, br = _box(100, 100), _box(200, 104), _box(96, 200), _box(203, 198)
    assert reading_order(np.array([br, tr, bl, tl])) == [3, 1, 2, 0]  # TL, TR, BL, BR


def test_reading_order_column_and_tolerance():
    top, below = _box(100, 100), _box(98, 180)  # 2 px further left, a row lower: still second
    assert reading_order(np.array([below, top])) == [1, 0]
    # side by side, one face 15 px lower (under half a face height): one row, left to right
    assert reading_order(np.array([_box(300, 115), _box(100, 100)])) == [1, 0]
    assert reading_order(np.zeros((0, 4))) == []


def test_shared_two_person_inputs_keep_their_order(detector):
    from fantasyportrait_core.media.video import read_image

    faces = detect_reference(detector, read_image(data_path("two_person.png")))
    assert len(faces) == 2 and faces[0].center[0] < faces[1].center[0]
    frame = read_video(data_path("two_person.mp4"), max_frames=1).frames[0]
    faces = detect_reference(detector, frame)  # faces at quite different heights
    assert len(faces) == 2 and faces[0].center[0] < faces[1].center[0]


# ----------------------------------------------------------------------------------------------
# Restore guard and out-of-memory


def test_restored_puts_processors_hooks_and_devices_back(tiny):
    from fantasyportrait_core.model.attention import PortraitCondition, attach_portrait_processors
    from fantasyportrait_core.runtime.restore import restored

    transformer, adapter = copy.deepcopy(tiny[0]), copy.deepcopy(tiny[1])
    state = attach_portrait_processors(transformer, adapter)
    before = dict(transformer.attn_processors)
    n_hooks = len(transformer.blocks[0]._forward_hooks)

    class Interrupted(Exception):
        pass

    with pytest.raises(Interrupted):
        with restored(transformer, state, (transformer, adapter), "cpu"):
            state.condition = PortraitCondition(torch.zeros(1, 1, 97, 8))
            transformer.set_attn_processor({k: type(v)() if k.endswith("attn1.processor") else v
                                            for k, v in before.items()})
            transformer.blocks[0].register_forward_hook(lambda *a: None)
            raise Interrupted  # ComfyUI's Cancel / Ctrl-C / an error
    assert state.condition is None
    assert transformer.attn_processors == before
    assert len(transformer.blocks[0]._forward_hooks) == n_hooks


def test_out_of_memory_messages_name_the_fix(tmp_path, capsys, fast_models, monkeypatch):
    from nodes import sampler

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(generate, "generate_latent", oom)
    assert _run(tmp_path, image="man.jpeg", driving=("jgz.mp4",)) == 3
    err = capsys.readouterr().err
    assert "ran out of GPU memory (--max-size 128, --frames 1," in err and "set --fp8" in err
    assert "--offload block" in err and "lower --max-size, --frames or --context-frames" in err
    msg = sampler.oom_message(torch.nn.Linear(1024, 1024), 832, 480, 81, 81, "none")
    assert "832x480, 81 frames" in msg and "storage = fp8_e4m3fn" in msg and "offload = block" in msg
    # already fp8: the advice does not suggest fp8 again
    msg = sampler.oom_message(torch.nn.Linear(1024, 1024), 832, 480, 81, 81, "none", fp8=True)
    assert "fp8_e4m3fn" not in msg and "offload = block" in msg


def test_nan_latent_is_an_error_not_a_video(tiny, monkeypatch):
    from fantasyportrait_core.model.attention import attach_portrait_processors
    from fantasyportrait_core.model.denoiser import I2VConditioning

    monkeypatch.setattr(generate, "sample", lambda *a, **k: torch.full((1, 16, 2, 2, 2), float("nan")))
    transformer = copy.deepcopy(tiny[0])
    state = attach_portrait_processors(transformer, copy.deepcopy(tiny[1]))
    c = transformer.config
    cond = I2VConditioning(torch.zeros(1, 4, c.text_dim), None, torch.zeros(1, 257, c.image_dim),
                           torch.zeros(1, 20, 2, 2, 2))
    with pytest.raises(FloatingPointError, match="8 NaN/infinite latent value"):
        generate.generate_latent(transformer, state, cond, None, 5, 16, 16, steps=1)


def test_assignment_errors_are_input_errors():
    faces = [Face(np.array(_box(100, 100)), np.zeros((5, 2)), 1.0)]
    for call in (lambda: assign_faces([], 1), lambda: assign_faces(faces, 2),
                 lambda: assign_faces(faces, 1, order=[3]), lambda: assign_faces(faces, 1, mode="nope")):
        with pytest.raises(InputError):
            call()


def test_written_files_get_a_plain_new_files_permissions(tmp_path):
    """Videos, performances and previews are written via a temporary file (mkstemp makes it 0600);
    the result must be readable like any new file (0666 less the umask), not private to its owner."""
    import stat

    import numpy as np

    from fantasyportrait_core.media.video import atomic_write, write_video

    mask = os.umask(0)
    os.umask(mask)
    video = write_video(str(tmp_path / "out.mp4"), np.zeros((3, 16, 16, 3), np.uint8), 25.0)
    with atomic_write(str(tmp_path / "x.bin")) as tmp, open(tmp, "wb") as f:
        f.write(b"1")
    for p in (video, str(tmp_path / "x.bin")):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~mask, p
    assert sorted(os.listdir(tmp_path)) == ["out.mp4", "x.bin"], "no temporary file left"


def test_same_frames_encode_to_the_same_video(tmp_path):
    """Repeatable output: the same frames written twice decode to the same frames. x264's
    macroblock-tree rate control made every write of busy content a different bitstream (up to
    26/255 apart decoded), so two runs of the demo on one commit could not be compared."""
    rng = np.random.default_rng(0)
    blocks = np.repeat(np.repeat(rng.integers(0, 256, (33, 20, 20, 3)), 8, 1), 8, 2)
    frames = np.clip(blocks + rng.normal(0, 20, blocks.shape), 0, 255).astype(np.uint8)
    decoded = []
    for i in range(4):
        write_video(str(tmp_path / f"v{i}.mp4"), frames, 25.0)
        decoded.append(np.stack(read_video(str(tmp_path / f"v{i}.mp4")).frames))
    for i, v in enumerate(decoded[1:], 1):
        assert v.shape == frames.shape
        assert np.array_equal(v, decoded[0]), f"write {i}: {np.abs(v.astype(int) - decoded[0]).max()}/255 apart"

"""Video and image IO with PyAV (bundled FFmpeg; no ffmpeg binary needed).

Frames are ``[F, H, W, 3]`` uint8 RGB numpy arrays throughout the core. Driving videos are read as
streams (:class:`VideoStream`): only the frames a generation uses are decoded and converted, one at
a time, so memory does not grow with the clip's length. Results are written to a temporary file in
the destination folder and renamed when complete (:func:`write_video`); :func:`save_video` adds the
fallbacks that make sure a finished result is never lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from fantasyportrait_core.validate import InputError

log = logging.getLogger("FantasyPortrait")


@dataclass
class Video:
    """Decoded video: ``frames [F, H, W, 3]`` uint8 RGB, ``fps`` float, and the path it came from
    (kept so the audio track can be muxed into an output later)."""

    frames: np.ndarray
    fps: float
    path: str | None = None

    def __len__(self) -> int:
        return len(self.frames)


def read_image(path: str) -> np.ndarray:
    """Read an image file as ``[H, W, 3]`` uint8 RGB (alpha dropped, grayscale expanded).

    Raises:
        InputError: naming the path when missing or undecodable.
    """
    from PIL import Image

    if not os.path.isfile(path):
        raise InputError(f"reference image not found: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise InputError(f"cannot decode image {path}: {e}") from e


def probe_image(path: str, name: str = "image") -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels.

    Raises:
        InputError: missing or not an image.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise InputError(f"{name} '{path}' not found") from None
    except Exception as e:
        raise InputError(f"{name} '{path}' is not an image PIL can read ({type(e).__name__}); use a PNG or JPEG") from None


OUTPUT_FPS = 25.0  # the reference resamples every driving video to 25 fps (utils.change_video_fps)


def resample_indices(num_frames: int, src_fps: float, dst_fps: float) -> np.ndarray:
    """Source frame index for each output frame when ``num_frames`` at ``src_fps`` are shown at
    ``dst_fps`` for the same duration: output frame i (time ``i / dst_fps``) takes the source frame
    nearest in time, as ``ffmpeg -r`` does (the reference's ``change_video_fps``).

    Returns:
        int64 ``[round(num_frames · dst_fps / src_fps)]`` (at least 1), values in ``[0, num_frames)``.
    Raises:
        ValueError: for a frame rate that is not positive or no frames.
    """
    if not (src_fps > 0 and dst_fps > 0):
        raise ValueError(f"frame rates must be > 0, got {src_fps} -> {dst_fps}")
    if num_frames < 1:
        raise ValueError("no frames to resample")
    if abs(src_fps - dst_fps) < 1e-3:
        return np.arange(num_frames)
    n = max(1, int(round(num_frames * dst_fps / src_fps)))
    return np.minimum(np.floor(np.arange(n) * src_fps / dst_fps + 0.5).astype(np.int64), num_frames - 1)


def resample_fps(video: Video, fps: float) -> Video:
    """Nearest-frame resampling of ``video`` to ``fps`` (same duration), so several driving videos
    with different frame rates stay in step frame by frame (:func:`resample_indices`)."""
    if abs(video.fps - fps) < 1e-3:
        return video
    return Video(video.frames[resample_indices(len(video), video.fps, fps)], fps, video.path)


class VideoStream:
    """A driving video read lazily, re-iterable: each ``iter()`` decodes from the start and yields
    ``[H, W, 3]`` uint8 RGB frames, resampled to ``fps`` (nearest frame, :func:`resample_indices`),
    at most ``max_frames`` of them; the rest of the file is never decoded.

    Memory: one decoded frame plus the decoder's own buffers (a few frames), whatever the clip's
    length. Opening probes the container (no frame is converted).

    Args:
        path: video file.
        fps: output frame rate (``None``: the file's).
        max_frames: frames to yield at most (``None``: all).
        name: how the input is called in error messages (``--driving``, ``images``...).
    Raises:
        InputError: missing file, no video stream, or (while iterating) an undecodable frame.
    """

    def __init__(self, path: str, fps: float | None = None, max_frames: int | None = None, name: str = "driving video"):
        import av

        if not os.path.isfile(path):
            raise InputError(f"{name} not found: {path}")
        self.path, self.name, self.max_frames = path, name, max_frames
        try:
            with av.open(path) as c:
                if not c.streams.video:
                    raise InputError(f"{name} '{path}' has no video stream; give a video file")
                s = c.streams.video[0]
                rate = s.average_rate or s.guessed_rate
                self.source_fps = float(rate) if rate else 25.0
                if not rate:
                    log.warning("[FantasyPortrait] %s has no frame rate; assuming 25 fps", path)
                self.width, self.height = s.codec_context.width, s.codec_context.height
                duration = float(s.duration * s.time_base) if s.duration and s.time_base else \
                    (c.duration / 1e6 if c.duration else None)
                self.source_frames = int(s.frames) or (round(duration * self.source_fps) if duration else None)
                self.has_audio = bool(c.streams.audio)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"{name} '{path}' cannot be opened as a video ({type(e).__name__}: {e})") from None
        self.fps = float(fps) if fps else self.source_fps

    def __repr__(self) -> str:
        return f"VideoStream({self.path!r}, fps={self.fps:g}, max_frames={self.max_frames})"

    def estimated_frames(self) -> int | None:
        """Frames iteration will yield, from the container's metadata (may be off by a few)."""
        if self.source_frames is None:
            return self.max_frames
        n = len(resample_indices(self.source_frames, self.source_fps, self.fps))
        return n if self.max_frames is None else min(n, self.max_frames)

    def __iter__(self):
        import av

        limit = self.max_frames if self.max_frames is not None else float("inf")
        if limit <= 0:
            return
        ratio = self.source_fps / self.fps
        same = abs(ratio - 1.0) < 1e-3 * ratio
        j, want = 0, 0  # next output frame and the source frame it shows
        i = -1
        try:
            with av.open(self.path) as c:
                stream = c.streams.video[0]
                stream.thread_type = "AUTO"
                for i, frame in enumerate(c.decode(stream)):
                    if i < want:
                        continue  # not shown: skip the colour conversion
                    rgb = frame.to_ndarray(format="rgb24")
                    while want == i:
                        yield rgb
                        j += 1
                        if j >= limit:
                            return
                        want = j if same else int(np.floor(j * ratio + 0.5))  # the rule of resample_indices
        except InputError:
            raise
        except av.error.FFmpegError as e:
            raise InputError(f"{self.name} '{self.path}': frame {i + 1} cannot be decoded ({e}); the file may be "
                             f"truncated or corrupt: re-export it") from None
        if j == 0:
            raise InputError(f"{self.name} '{self.path}' has no decodable video frame")

    def read(self) -> Video:
        """Decode into memory (what the stream yields)."""
        return Video(np.stack(list(self)), self.fps, self.path)


def read_video(path: str, max_frames: int | None = None, fps: float | None = None) -> Video:
    """Decode the first video stream of ``path`` to RGB frames (at most ``max_frames``, resampled
    to ``fps`` if given).

    Raises:
        InputError: missing file, no video stream, or no decodable frame.
    """
    return VideoStream(path, fps=fps, max_frames=max_frames).read()


def iter_batches(frames, size: int):
    """``[B, H, W, 3]`` batches of at most ``size`` frames from an array or any iterable of frames
    (such as a :class:`VideoStream`), without materialising more than one batch."""
    if isinstance(frames, np.ndarray):
        for i in range(0, len(frames), size):
            yield frames[i:i + size]
        return
    batch = []
    for f in frames:
        batch.append(f)
        if len(batch) == size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def _new_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_NEW_FILE_MODE = _new_file_mode()


@contextlib.contextmanager
def atomic_write(path: str, suffix: str = ""):
    """Write ``path`` whole or not at all: yields a temporary path in ``path``'s folder (a hidden
    ``.NAME.*.partial<suffix>`` file) that replaces ``path`` when the block ends without an error, with
    the permissions of a plain new file (``0o666`` less the umask), and is removed when it raises (the
    error propagates; the folder must exist).

    Raises:
        OSError: the temporary file cannot be made or moved into place.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".partial" + suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _NEW_FILE_MODE)  # mkstemp makes it 0600; the result gets a plain new file's mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_video(path: str, frames: np.ndarray, fps: float, audio_from: str | None = None, crf: int = 18) -> str:
    """Encode ``frames [F, H, W, 3]`` uint8 RGB as H.264 (yuv420p) in the container of ``path``'s
    extension (.mp4, .mov, .mkv), optionally with the audio of ``audio_from`` (re-encoded to AAC,
    cut to the video's length).

    Odd sizes are padded by one pixel (yuv420p needs even sizes). The file is written under a
    temporary name in the same folder and renamed when complete, so ``path`` is either the whole
    video or untouched, and nothing is left behind on failure.

    Returns:
        ``path``.
    Raises:
        ValueError: for frames that are not ``[F, H, W, 3]`` uint8 or a bad ``fps``.
        OSError / av errors: when writing fails (the temporary file is removed).
    """
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be [F>0, H, W, 3] uint8, got {frames.shape} {frames.dtype}")
    if not (np.isfinite(fps) and 0 < fps <= 1000):
        raise ValueError(f"fps must be in (0, 1000], got {fps}")
    f, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    with atomic_write(path, os.path.splitext(path)[1] or ".mp4") as tmp:
        with av.open(tmp, "w", format=_FORMATS.get(os.path.splitext(path)[1].lower(), "mp4")) as out:
            vs = out.add_stream("libx264", rate=rate)
            vs.width, vs.height = frames.shape[2], frames.shape[1]
            vs.pix_fmt = "yuv420p"
            # mbtree off: x264's macroblock-tree rate control gives run-to-run different bitstreams
            # for the same frames (up to 26/255 apart decoded); without it the encode is repeatable.
            vs.options = {"crf": str(crf), "x264-params": "mbtree=0"}
            audio_in = None
            if audio_from is not None:
                audio_in = av.open(audio_from)
                if not audio_in.streams.audio:
                    audio_in.close()
                    audio_in = None
            try:
                if audio_in is not None:
                    a_in = audio_in.streams.audio[0]
                    as_ = out.add_stream("aac", rate=a_in.rate or 44100)
                for img in frames:
                    for packet in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                        out.mux(packet)
                for packet in vs.encode():
                    out.mux(packet)
                if audio_in is not None:
                    duration = f / fps
                    resampler = av.AudioResampler(format=as_.format.name, layout=as_.layout.name, rate=as_.rate)
                    for frame in audio_in.decode(a_in):
                        if frame.time is not None and frame.time >= duration:
                            break
                        frame.pts = None
                        for rf in resampler.resample(frame):
                            for packet in as_.encode(rf):
                                out.mux(packet)
                    for packet in as_.encode():
                        out.mux(packet)
            finally:
                if audio_in is not None:
                    audio_in.close()
    return path


_FORMATS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}


@dataclass
class SaveResult:
    """What :func:`save_video` wrote: ``path`` (the video, or ``None``), whether it has audio, the
    fallback file holding the frames when the video could not be written, and why."""

    path: str | None
    audio: bool
    fallback: str | None = None
    error: str | None = None


def save_video(path: str, frames: np.ndarray, fps: float, audio_from: str | None = None) -> SaveResult:
    """Write a finished result so that it is never lost.

    1. :func:`write_video` with the audio of ``audio_from``;
    2. if that fails and there was audio: again without audio (a broken audio track must not cost
       the video), with a warning;
    3. if the video still cannot be written: the frames go to ``<path stem>.frames.npz`` next to
       it (uint8 ``frames [F, H, W, 3]`` + ``fps``; lossless), or into the system temp folder when
       that folder is not writable either; the log says where and how to encode it later
       (``python -m fantasyportrait_core.cli encode``).

    Returns:
        :class:`SaveResult`.
    Raises:
        OSError: only if not even the fallback could be written anywhere.
    """
    errors = []
    for audio in ([audio_from, None] if audio_from else [None]):
        try:
            write_video(path, frames, fps, audio_from=audio)
            if audio is None and audio_from:
                log.warning("[FantasyPortrait] the audio of %s could not be copied (%s); %s has no sound",
                            audio_from, errors[-1], path)
            return SaveResult(path, audio is not None and _has_audio(audio))
        except Exception as e:  # keep trying: the frames are the product of minutes of work
            errors.append(f"{type(e).__name__}: {e}")
    stem = os.path.splitext(os.path.basename(path))[0]
    for folder in (os.path.dirname(os.path.abspath(path)), tempfile.gettempdir()):
        target = os.path.join(folder, stem + ".frames.npz")
        try:
            with atomic_write(target, ".npz") as tmp, open(tmp, "wb") as fh:
                np.savez(fh, frames=np.asarray(frames), fps=np.float64(fps))
        except OSError:
            continue
        log.error("[FantasyPortrait] could not write %s (%s); the frames are saved in %s; encode them with: "
                  "python -m fantasyportrait_core.cli encode %s --out VIDEO.mp4", path, errors[-1], target, target)
        return SaveResult(None, False, target, errors[-1])
    raise OSError(f"could not write {path} ({errors[-1]}) nor a fallback file next to it or in {tempfile.gettempdir()}")


def load_frames(path: str) -> tuple[np.ndarray, float]:
    """Frames and fps from a :func:`save_video` fallback ``*.frames.npz``.

    Raises:
        InputError: not such a file.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["frames"], float(z["fps"])
    except (OSError, KeyError, ValueError) as e:
        raise InputError(f"'{path}' is not a frames file written by FantasyPortrait ({e})") from None


def _has_audio(path: str) -> bool:
    import av

    try:
        with av.open(path) as c:
            return bool(c.streams.audio)
    except Exception:
        return False


def probe_video(path: str) -> dict:
    """Frame count, size, fps and whether ``path`` has audio (decodes the video stream)."""
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(s))
        return {"frames": n, "width": s.codec_context.width, "height": s.codec_context.height,
                "fps": float(s.average_rate or 0), "audio": bool(c.streams.audio)}

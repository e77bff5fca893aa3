"""Video and image IO with PyAV (bundled FFmpeg; no ffmpeg binary needed).

Frames are ``[F, H, W, 3]`` uint8 RGB numpy arrays throughout the core.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction

import numpy as np


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
    """Read an image file as ``[H, W, 3]`` uint8 RGB.

    Raises:
        FileNotFoundError / ValueError: naming the path when missing or undecodable.
    """
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference image not found: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise ValueError(f"cannot decode image {path}: {e}") from e


def read_video(path: str, max_frames: int | None = None) -> Video:
    """Decode the first video stream of ``path`` to RGB frames.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if it has no video stream or no decodable frame.
    """
    import av

    if not os.path.isfile(path):
        raise FileNotFoundError(f"driving video not found: {path}")
    try:
        container = av.open(path)
    except Exception as e:
        raise ValueError(f"cannot open video {path}: {e}") from e
    with container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 25)
        frames = []
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"{path} has no decodable video frame")
    return Video(np.stack(frames), fps, path)


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
    """Nearest-frame resampling of ``video`` to ``fps`` (same duration; :func:`resample_indices`),
    so several driving videos with different frame rates stay in step frame by frame."""
    if abs(video.fps - fps) < 1e-3:
        return video
    return Video(video.frames[resample_indices(len(video), video.fps, fps)], fps, video.path)


def write_video(path: str, frames: np.ndarray, fps: float, audio_from: str | None = None, crf: int = 18) -> str:
    """Encode ``frames [F, H, W, 3]`` uint8 RGB as H.264 MP4 (yuv420p), optionally copying the
    audio of ``audio_from`` (re-encoded to AAC, cut to the video's length).

    Odd sizes are padded by one pixel (yuv420p needs even sizes). Writes to a temporary name and
    renames, so an interrupted write never leaves a truncated file under ``path``.

    Returns:
        ``path``.
    """
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be [F, H, W, 3] uint8, got {frames.shape} {frames.dtype}")
    f, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".partial.mp4"
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(tmp, "w") as out:
        vs = out.add_stream("libx264", rate=rate)
        vs.width, vs.height = frames.shape[2], frames.shape[1]
        vs.pix_fmt = "yuv420p"
        vs.options = {"crf": str(crf)}
        audio_in = None
        if audio_from is not None:
            audio_in = av.open(audio_from)
            if not audio_in.streams.audio:
                audio_in.close()
                audio_in = None
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
            audio_in.close()
    os.replace(tmp, path)
    return path


def probe_video(path: str) -> dict:
    """Frame count, size, fps and whether ``path`` has audio (decodes the video stream)."""
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(s))
        return {"frames": n, "width": s.codec_context.width, "height": s.codec_context.height,
                "fps": float(s.average_rate or 0), "audio": bool(c.streams.audio)}

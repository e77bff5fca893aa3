"""End-to-end steps shared by the CLI and the ComfyUI nodes.

Data flow (one function per arrow): reference image + driving video(s)
→ :func:`encode_driving` (faces, aligned crops, expression features per person)
→ :func:`reference_layout` (reference faces, per-person regions, latent person map)
→ :func:`portrait_condition` (expression tokens in per-latent-frame windows + masks)
→ :func:`generate_latent` (flow sampling with dual guidance) → VAE decode → frames.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from fantasyportrait_core.model.adapter import window_length, window_tokens
from fantasyportrait_core.model.geometry import TOKEN_STRIDE, floor_to_4k1, latent_frames, latent_shape
from fantasyportrait_core.model.attention import PortraitCondition, PortraitState
from fantasyportrait_core.sampling.windows import ContextWindowDenoiser
from fantasyportrait_core.model.denoiser import I2VConditioning, PortraitDenoiser, first_frame_mask
from fantasyportrait_core.model.expression import CROP_SIZE, align_face, encode_expressions
from fantasyportrait_core.faces.face import Face, FaceTrack, detect_video, in_reading_order, order_tracks, rank_tracks, track_faces
from fantasyportrait_core.faces.regions import (box_masks, expand_box, latent_person_map, motion_range, pool_to_tokens,
                    token_person_ids)
from fantasyportrait_core.model.build import denormalize_latent, normalize_latent
from fantasyportrait_core.sampling.flow import StepInfo, initial_noise, sample, start_latent

log = logging.getLogger("FantasyPortrait")


@contextlib.contextmanager
def on_device(module: torch.nn.Module, device):
    """Put ``module`` on ``device`` for a stage and back where it was afterwards (frees VRAM between
    stages on small cards). Going back re-points each weight at the tensor it had before
    (:class:`~fantasyportrait_core.runtime.residency.WeightHome`): memory-mapped weights are not copied
    into RAM, as ``module.to("cpu")`` would."""
    from fantasyportrait_core.runtime.residency import WeightHome

    home = WeightHome(module)
    home.to(device)
    try:
        yield module
    finally:
        home.go_home()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Driving side


@dataclass
class DrivingExpression:
    """One character's expression sequence from a driving video.

    Attributes:
        features: float32 ``[F, 554]`` (headpose, eye, emotion, mouth) per frame.
        track: the face track the crops were aligned from (``track.missing``: filled frames).
        crops: uint8 ``[F, 224, 224, 3]`` aligned crops (for previews).
        source: the driving video as the user knows it (file name where known), for labels and messages.
        track_index: which person of that video (0-based, reading order of the tracked ones).
        fps: frame rate of ``features`` (the output rate the driver was resampled to), or ``None``.
        people_seen: people found through that video (face tracks in at least
            :data:`PRESENT_FRACTION` of the frames), so callers can say how many were left unused.
    """

    features: torch.Tensor
    track: FaceTrack
    crops: np.ndarray = field(repr=False, default=None)
    source: str = "driving video"
    track_index: int = 0
    fps: float | None = None
    people_seen: int = 1

    @property
    def num_frames(self) -> int:
        return self.features.shape[0]

    @property
    def label(self) -> str:
        """Which track of which video, e.g. ``"drive3.mp4 #2"``."""
        return f"{os.path.basename(self.source)} #{self.track_index}"


LANDMARK_FILTERS = ("one_euro", "none")
PRESENT_FRACTION = 0.2  # a face track counts as a person of the video when detected in >= 20 % of frames


@contextlib.contextmanager
def _no_progress(desc: str, total: int | None):
    yield lambda n: None


def encode_driving(detector, encoder, frames, people: int = 1, smooth: float = 0.0,
                   landmark_filter: str = "one_euro", source: str = "driving video", fps: float | None = None,
                   progress=None) -> list[DrivingExpression]:
    """Expression features of the ``people`` most present faces of a driving video.

    Every frame gets features: where a face is missing its landmarks are interpolated from the
    nearest frames with a face (listed in ``track.missing``), so the length always equals the
    frame count.

    Streaming: ``frames`` is iterated twice (detection, then alignment), one detection batch at a
    time; besides that batch only the per-frame face boxes and one 224×224 crop per frame and
    person are kept, so with a :class:`~fantasyportrait_core.media.video.VideoStream` memory is
    ``16 frames + F · people · 147 KiB`` whatever the clip's length.

    Args:
        detector: face detector (``detect(image) -> list[Face]``, optionally ``detect_batch``).
        encoder: :class:`~fantasyportrait_core.model.expression.FanEncoder`.
        frames: uint8 ``[F, H, W, 3]`` RGB, or a re-iterable of ``[H, W, 3]`` frames that yields the
            same frames each time (a ``VideoStream``), already at the output frame rate (the
            reference resamples every driver to 25 fps first; :func:`~fantasyportrait_core.media.video.resample_indices`).
        people: characters to take from this video (the most present ones, in reading order).
        smooth: extra Gaussian smoothing of the landmarks, sigma in frames (0 = none, as the
            reference); applied after ``landmark_filter``.
        landmark_filter: ``"one_euro"`` (default, the reference's tracker filter:
            :func:`one_euro_landmarks`) or ``"none"`` (raw detector landmarks).
        source: the driving video as the user knows it, for labels (``"drive3.mp4"`` ->
            ``"drive3.mp4 #1"``) and messages.
        fps: the frame rate of ``frames`` (kept for reports; nothing is resampled here).
        progress: optional ``progress(description, total)`` context manager yielding
            ``update(n)`` (a tqdm or ComfyUI progress bar).
    Returns:
        ``people`` :class:`DrivingExpression`, in reading order.
    Raises:
        InputError: no frame, no face in any frame, or fewer people than ``people`` (names the
            video and both counts); an unknown ``landmark_filter``.
    """
    from fantasyportrait_core.validate import InputError

    if landmark_filter not in LANDMARK_FILTERS:
        raise InputError(f"landmark filter {landmark_filter!r}: choose one of {LANDMARK_FILTERS}")
    name = source
    progress = progress or _no_progress
    total = len(frames) if hasattr(frames, "__len__") else getattr(frames, "estimated_frames", lambda: None)()
    with progress(f"faces in {os.path.basename(name)}", total) as update:
        per_frame = detect_video(detector, frames, progress=update)
    if not per_frame:
        raise InputError(f"{name}: the driving video has no frames")
    try:
        all_tracks = track_faces(per_frame)
    except ValueError:
        raise InputError(f"{name}: no face was found in any of its {len(per_frame)} frame(s); use a video showing "
                         f"the face clearly (or remove it)") from None
    seen = [t for t in all_tracks if t.detected.mean() >= PRESENT_FRACTION]
    if len(all_tracks) < people:
        raise InputError(f"{name} shows {len(all_tracks)} face(s) but {people} character(s) were asked of it; set "
                         f"people to {len(all_tracks)} or use another video")
    tracks = order_tracks(rank_tracks(all_tracks)[:people])
    if len(seen) > people:
        log.warning("[FantasyPortrait] %s shows %d people; animating the %d most present (people = %d). Set people to "
                    "%d to animate them all.", name, len(seen), people, people, len(seen))
    landmarks = []
    for t in tracks:
        lm = t.landmarks
        if landmark_filter == "one_euro":
            lm = one_euro_landmarks(lm, t.boxes[:, 2] - t.boxes[:, 0])
        if smooth > 0:
            lm = smooth_over_time(lm, smooth)
        landmarks.append(lm)
    crops = [np.empty((len(per_frame), CROP_SIZE, CROP_SIZE, 3), np.uint8) for _ in tracks]
    with progress(f"expressions in {os.path.basename(name)}", len(per_frame) * len(tracks)) as update:
        i = 0
        for i, frame in enumerate(frames):
            if i >= len(per_frame):
                break
            for k, lm in enumerate(landmarks):
                crops[k][i] = align_face(frame, lm[i])
        if i + 1 != len(per_frame):
            raise InputError(f"{name}: the video gave {len(per_frame)} frames, then {i + 1}; it must be readable twice")
        out = []
        for k, (track, c) in enumerate(zip(tracks, crops)):
            feats = []
            for start in range(0, len(c), ENCODE_BATCH):
                feats.append(encode_expressions(encoder, c[start:start + ENCODE_BATCH]))
                update(len(feats[-1]))
            out.append(DrivingExpression(torch.cat(feats), track, c, source, k, fps, max(len(seen), people)))
            if track.missing:
                log.warning("[FantasyPortrait] %s #%d: no face in %d frame(s) %s; filled from neighbouring frames",
                            name, k, len(track.missing), _short(track.missing))
    return out


ENCODE_BATCH = 32


def smooth_over_time(values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of ``values [F, ...]`` along frames (edges: reflect), ``sigma`` in frames."""
    values = np.asarray(values, dtype=np.float64)
    radius = max(1, int(3 * sigma + 0.5))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    flat = values.reshape(len(values), -1)
    padded = np.pad(flat, ((radius, radius), (0, 0)), mode="reflect" if len(values) > radius else "edge")
    out = np.stack([np.convolve(padded[:, j], k, mode="valid") for j in range(flat.shape[1])], axis=1)
    return out.reshape(values.shape)


@dataclass(frozen=True)
class OneEuroGroup:
    """The reference's adaptive One-Euro settings for one landmark group (``Smoother222``).

    The group's mean motion since the previous frame, divided by the face size, picks the filter's
    time step ``t_e`` (the reference's ``fcmin``) and its ``beta``: below ``still`` both ramp from 0
    to ``slow`` (a still face is held still), between ``still`` and ``moving`` from ``slow`` to
    ``fast``, above ``moving`` both are ``fast`` (the point follows almost at once).
    """

    points: tuple[int, ...]
    still: float
    moving: float
    slow: float
    fast: float

    def settings(self, motion: float) -> tuple[float, float]:
        """``(t_e, beta)`` for a mean relative motion ``motion``."""
        if motion < self.still:
            t = self.slow * motion / self.still
        elif motion < self.moving:
            t = self.slow + (self.fast - self.slow) * (motion - self.still) / (self.moving - self.still)
        else:
            t = self.fast
        return t, t


# Our 5 alignment points (left eye, right eye, nose, left/right mouth corner) are the reference's
# 222-point indices 182 / 202 (pupil groups), 36 (nose group), 149 / 133 (mouth group); each takes its
# group's settings from ``Smoother222.smooth`` (camer.py).
ONE_EURO_GROUPS = (
    OneEuroGroup((0,), 0.003, 0.02, 0.03, 0.7),    # left pupil
    OneEuroGroup((1,), 0.003, 0.02, 0.03, 0.7),    # right pupil
    OneEuroGroup((2,), 0.003, 0.02, 0.03, 0.7),    # nose
    OneEuroGroup((3, 4), 0.003, 0.02, 0.05, 0.7),  # mouth
)
ONE_EURO_MIN_CUTOFF = 1.0  # reference OneEuroFilter defaults (camer.py)
ONE_EURO_D_CUTOFF = 1.0


def _smoothing_factor(t_e: float, cutoff):
    r = 2 * np.pi * cutoff * t_e
    return r / (r + 1)


def one_euro_landmarks(landmarks: np.ndarray, face_size: np.ndarray,
                       groups: tuple[OneEuroGroup, ...] = ONE_EURO_GROUPS) -> np.ndarray:
    """Causal One-Euro filtering of a landmark track, as the reference's face tracker does.

    Formulation: Casiez et al., "1€ Filter" (CHI 2012), with the reference's adaptive settings
    (``OneEuroFilter`` and ``Smoother222`` in ``diffsynth/models/camer.py``): per frame and group,
    ``t_e, beta`` from the group's mean motion relative to the face size (:class:`OneEuroGroup`);
    ``dx = (x − x̂_prev) / t_e``; ``dx̂ = α(t_e, d_cutoff)·dx + (1 − α)·dx̂_prev``;
    ``x̂ = α(t_e, min_cutoff + beta·|dx̂|)·x + (1 − α)·x̂_prev`` with ``α(t, c) = r / (r + 1)``,
    ``r = 2π·c·t``. The first frame passes unchanged. A group that has not moved at all
    (``t_e = 0``, where the reference divides by zero) keeps its previous value.

    Differences from the reference, which runs on 222 points: the motion of a group is that of our
    1–2 points of it; the face size is the previous frame's detector box width (the reference:
    the distance between the jaw-contour ends, times ``1 + (|pitch| + 0.6·|yaw|) / 18``); the
    reference's tracker also restarts the filter on frames where a fresh detection's landmark box is
    the larger one (a side effect of its duplicate-face removal), which is not reproduced.

    Args:
        landmarks: float ``[F, P, 2]`` pixels (``P = 5``: left eye, right eye, nose, mouth corners).
        face_size: float ``[F]`` pixels (face width per frame).
        groups: point groups and their settings (default: the reference's for the 5 points).
    Returns:
        float64 ``[F, P, 2]``.
    Raises:
        ValueError: if the shapes do not match or a face size is not positive.
    """
    x = np.asarray(landmarks, dtype=np.float64)
    size = np.asarray(face_size, dtype=np.float64).reshape(-1)
    if x.ndim != 3 or x.shape[-1] != 2 or len(size) != len(x):
        raise ValueError(f"landmarks must be [F, P, 2] with one face size per frame, got {x.shape} and {size.shape}")
    if len(x) and not (size > 0).all():
        raise ValueError("face sizes must be positive")
    out = x.copy()
    dx_prev = np.zeros_like(x[0]) if len(x) else None
    a_d_of = lambda t: _smoothing_factor(t, ONE_EURO_D_CUTOFF)  # noqa: E731
    for f in range(1, len(x)):
        prev = out[f - 1]
        motion = np.linalg.norm(x[f] - prev, axis=-1) / size[f - 1]  # [P]
        for g in groups:
            idx = list(g.points)
            t_e, beta = g.settings(float(motion[idx].mean()))
            if t_e <= 0.0:
                out[f, idx] = prev[idx]
                continue
            dx = (x[f, idx] - prev[idx]) / t_e
            a_d = a_d_of(t_e)
            dx_hat = a_d * dx + (1 - a_d) * dx_prev[idx]
            a = _smoothing_factor(t_e, ONE_EURO_MIN_CUTOFF + beta * np.abs(dx_hat))
            out[f, idx] = a * x[f, idx] + (1 - a) * prev[idx]
            dx_prev[idx] = dx_hat
    return out


def _short(idx: list[int], n: int = 12) -> str:
    return str(idx[:n])[:-1] + (", ...]" if len(idx) > n else "]")


# ----------------------------------------------------------------------------------------------
# Reference side


def generation_size(width: int, height: int, max_size: int = 720, multiple: int = TOKEN_STRIDE) -> tuple[int, int]:
    """Output (width, height): longest side scaled to ``max_size`` then rounded *up* to a multiple
    of 16 (reference ``infer_multi.py`` + ``check_resize_height_width``)."""
    scale = max_size / max(width, height)
    w, h = int(width * scale), int(height * scale)
    return (-(-w // multiple) * multiple, -(-h // multiple) * multiple)


def resize_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize ``[H, W, 3]`` uint8 to ``width × height`` (area when shrinking, cubic when growing)."""
    interp = cv2.INTER_AREA if width * height < image.shape[0] * image.shape[1] else cv2.INTER_CUBIC
    return cv2.resize(image, (width, height), interpolation=interp)


@dataclass
class ReferenceLayout:
    """Characters in the reference image, at generation size.

    Attributes:
        faces: the face of each character, in character order (pixels of the generated size).
        regions: int ``[N, 4]`` per-character face regions (box widened by motion range).
        person_masks: bool ``[N, T, H, W]`` regions as masks (T = 1, or per frame if user-given).
        latent_person: long ``[F_lat, S]`` person id per latent token (0 = background).
    """

    faces: list[Face]
    regions: np.ndarray
    person_masks: torch.Tensor
    latent_person: torch.Tensor


ASSIGN_MODES = ("left_to_right", "right_to_left", "largest_first", "identity")


def detect_reference(detector, image: np.ndarray) -> list[Face]:
    """Faces of a reference image, numbered in reading order (:func:`~fantasyportrait_core.faces.face.reading_order`):
    the numbers the face preview shows and ``face_order`` takes."""
    return in_reading_order(detector.detect(image))


def assign_faces(faces: list[Face], count: int, order: list[int] | None = None, mode: str = "left_to_right",
                 driver_embeddings: list[np.ndarray | None] | None = None, order_name: str = "face_order") -> list[Face]:
    """Pick the reference face each of ``count`` characters animates; never by file order.

    ``faces`` are numbered in reading order (:func:`detect_reference`). Modes: ``left_to_right`` —
    character i takes face i in reading order (rows top to bottom, left to right in a row; one
    character: the largest face); ``right_to_left`` — the reverse reading order; ``largest_first``
    — character i takes the i-th largest face; ``identity`` — the assignment maximising the total
    cosine similarity between each character's driving-face embedding and the reference faces'
    embeddings (backends with embeddings, e.g. insightface). ``order[i]`` (a face number) overrides
    everything.

    Raises:
        InputError: no face, fewer faces than characters (names both counts), a bad ``order``,
            an unknown mode, or identity mode without embeddings.
    """
    from fantasyportrait_core.validate import InputError, check_face_order

    if not faces:
        raise InputError("no face found in the reference image; use a clearer, larger or more frontal face")
    if len(faces) < count:
        raise InputError(f"the reference image shows {len(faces)} face(s) but {count} driving expression sequence(s) "
                         f"(characters) were given; give at most {len(faces)} or use a reference with more faces")
    if order:
        check_face_order(order, count, len(faces), order_name)
        return [faces[i] for i in order]
    if mode == "left_to_right":
        return [max(faces, key=lambda f: f.area)] if count == 1 else list(faces[:count])
    if mode == "right_to_left":
        return list(faces[::-1][:count])
    if mode == "largest_first":
        return sorted(faces, key=lambda f: -f.area)[:count]
    if mode == "identity":
        if driver_embeddings is None or any(e is None for e in driver_embeddings) or \
                any(f.embedding is None for f in faces):
            raise InputError("identity assignment needs identity embeddings for the reference and driving faces: "
                             "use the insightface face detector, or another assignment")
        sim = np.array([[float(np.dot(d, f.embedding) / (np.linalg.norm(d) * np.linalg.norm(f.embedding) + 1e-9))
                         for f in faces] for d in driver_embeddings])
        best = max(itertools.permutations(range(len(faces)), count), key=lambda p: sum(sim[i, j] for i, j in enumerate(p)))
        return [faces[j] for j in best]
    raise InputError(f"unknown assignment mode {mode!r}; choose one of {ASSIGN_MODES}")


def parse_face_order(text: str | None, name: str = "face_order") -> list[int] | None:
    """``"1,0"`` -> ``[1, 0]``; empty -> ``None`` (see :func:`fantasyportrait_core.validate.parse_face_order`)."""
    from fantasyportrait_core.validate import parse_face_order as parse

    return parse(text, name)


def face_numbers(chosen: list[Face], faces: list[Face]) -> list[int]:
    """The face number (index in ``faces``, reading order) of each chosen face."""
    index = {id(f): k for k, f in enumerate(faces)}
    return [index[id(f)] for f in chosen]


def face_roles(chosen: list[Face], faces: list[Face], drivers: list["DrivingExpression"]):
    """One numbering of the reference faces for reports and previews: ``(numbers, unused, shown,
    labels)`` with the face number each character animates, the face numbers no character drives,
    the faces to draw (chosen, then unused) and their labels (``face #1 <- video.mp4``, ``face #2:
    no driver``), in the numbers ``face_order`` takes."""
    numbers = face_numbers(chosen, faces)
    unused = [k for k in range(len(faces)) if k not in numbers]
    labels = [f"face #{numbers[i]} <- {d.label}" for i, d in enumerate(drivers)]
    labels += [f"face #{k}: no driver" for k in unused]
    return numbers, unused, chosen + [faces[k] for k in unused], labels


def driver_embedding(driver: "DrivingExpression") -> np.ndarray | None:
    """Mean identity embedding of a driving track (``None`` when the backend gives none)."""
    embs = driver.track.embeddings
    return np.mean(embs, axis=0) if embs else None


def reference_layout(faces: list[Face], drivers: list[DrivingExpression], width: int, height: int, num_frames: int,
                     user_masks: list[torch.Tensor | None] | None = None) -> ReferenceLayout:
    """Per-character regions and the latent person map.

    Args:
        faces: the face of each character (:func:`assign_faces`), at generation size.
        drivers: one :class:`DrivingExpression` per character, same order.
        user_masks: optional per character ``[T, H, W]`` or ``[H, W]`` masks (any size; resized)
            replacing that character's box region; ``None`` entries keep the box.
    Raises:
        ValueError: if the counts differ.
    """
    if len(faces) != len(drivers):
        raise ValueError(f"{len(faces)} faces for {len(drivers)} characters")
    regions = np.stack([expand_box(f.box, motion_range(d.track.boxes), width, height) for f, d in zip(faces, drivers)])
    masks = box_masks(regions, height, width)[:, None]
    if user_masks is not None and any(m is not None for m in user_masks):
        per_frame = any(m is not None and m.ndim == 3 and m.shape[0] > 1 for m in user_masks)
        masks = masks.repeat(1, num_frames if per_frame else 1, 1, 1)
        for i, m in enumerate(user_masks):
            if m is not None:
                masks[i] = _fit_mask(torch.as_tensor(m), masks.shape[1], height, width)
    centers = np.stack([f.center for f in faces])
    latent_person = latent_person_map(pool_to_tokens(masks, num_frames), centers)
    return ReferenceLayout(list(faces), regions, masks, latent_person)


def _fit_mask(mask: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    """A user mask (``[H, W]`` or ``[T, H, W]``, any size, > 0.5 = inside) as bool ``[frames, height, width]``."""
    m = mask.float()
    m = m[None] if m.ndim == 2 else m
    if m.shape[-2:] != (height, width):
        m = torch.nn.functional.interpolate(m[:, None], size=(height, width), mode="nearest")[:, 0]
    if m.shape[0] != frames:
        if m.shape[0] < frames and frames > 1 and m.shape[0] > 1:
            raise ValueError(f"a character mask has {m.shape[0]} frames; give 1 or {frames}")
        m = m[:1].expand(frames, -1, -1)
    return m > 0.5


def portrait_condition(adapter, drivers: list[DrivingExpression], num_frames: int,
                       layout: ReferenceLayout | None, scale: float = 1.0) -> PortraitCondition:
    """Expression tokens of every character in per-latent-frame windows, plus their masks.

    One character: no mask (reference single-person behaviour). Several: windows concatenated
    along the token axis in character order, ``token_person`` / ``latent_person`` from ``layout``.

    Args:
        num_frames: pixel frames to generate (4k+1, at most every driver's length).
    Returns:
        :class:`~fantasyportrait_core.model.attention.PortraitCondition` with windows on the adapter's device.
    """
    latent_frames(num_frames)  # validates 4k+1
    short = [d.num_frames for d in drivers if d.num_frames < num_frames]
    if short:
        raise ValueError(f"a driving sequence has {min(short)} frames, fewer than the {num_frames} requested")
    p = next(adapter.parameters())
    feats = torch.stack([d.features[:num_frames] for d in drivers]).to(p.device)  # [N, F, 554]
    with torch.no_grad():
        tokens = adapter.expression_tokens(feats)  # [N, F*24, C]
        windows = window_tokens(tokens, num_frames)  # [N, F_lat, 97, C]
    windows = windows.permute(1, 0, 2, 3).flatten(1, 2)[None]  # [1, F_lat, N*97, C]
    if len(drivers) == 1:
        return PortraitCondition(windows, scale=scale)
    return PortraitCondition(windows, token_person_ids(len(drivers), window_length()),
                             layout.latent_person, scale=scale)


# ----------------------------------------------------------------------------------------------
# Generation


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> float ``[1, 3, 1, H, W]`` in ``[-1, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1.0


@torch.no_grad()
def encode_reference_latent(vae, image: np.ndarray, num_frames: int) -> torch.Tensor:
    """The 20-channel I2V condition ``[1, 20, F_lat, H/8, W/8]``: first-frame mask + normalised VAE
    latent of ``[reference, zeros × (F−1)]`` (reference ``encode_image``)."""
    p = next(vae.parameters())
    x = image_to_tensor(image)
    video = torch.cat([x, torch.zeros(1, 3, num_frames - 1, *x.shape[-2:])], dim=2).to(p.device, p.dtype)
    latent = normalize_latent(vae.encode(video).latent_dist.mode().float())
    mask = first_frame_mask(latent.shape[2], latent.shape[3], latent.shape[4]).to(latent)
    return torch.cat([mask, latent], dim=1).cpu()


@torch.no_grad()
def decode_latent(vae, latent: torch.Tensor) -> np.ndarray:
    """Normalised latent ``[1, 16, F_lat, h, w]`` -> uint8 frames ``[F, 8h, 8w, 3]``."""
    p = next(vae.parameters())
    video = vae.decode(denormalize_latent(latent.float()).to(p.device, p.dtype)).sample
    video = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return video.permute(1, 2, 3, 0).cpu().numpy()


def generate_latent(transformer, state: PortraitState, cond: I2VConditioning, portrait: PortraitCondition | None,
                    num_frames: int, width: int, height: int, steps: int = 30, seed: int = 42, cfg: float = 1.0,
                    portrait_cfg: float = 4.0, shift: float = 5.0, callback=None, context_frames: int | None = None,
                    context_overlap: int = 16, window_anchor: str = "reference", sampler: str = "euler", sigmas=None,
                    preset: str | None = None, denoise: float = 1.0, init_latent: torch.Tensor | None = None,
                    cfg_range=(0.0, 1.0), portrait_cfg_range=(0.0, 1.0), portrait_scales=(),
                    batch_passes: int | None = None, device=None, resolved=None) -> torch.Tensor:
    """Sample a normalised Wan latent ``[1, 16, F_lat, H/8, W/8]`` (float32, CPU).

    Defaults are the shipped reference settings (30 steps, shift 5, cfg 1, portrait cfg 4, seed 42,
    Euler). ``context_frames=None`` (default) denoises the whole video in one pass, as the reference
    does; a window length (pixel frames, from :func:`~fantasyportrait_core.sampling.windows.plan_context`)
    denoises longer videos in overlapping context windows (:mod:`fantasyportrait_core.sampling.windows`;
    overlap ``context_overlap`` pixel frames; later windows anchored on the reference image unless
    ``window_anchor="none"``). ``callback(StepInfo)`` runs after each step and may raise to interrupt.

    Sampling options (:mod:`fantasyportrait_core.sampling.flow`): ``sampler`` (:data:`~.sampling.SAMPLERS`);
    the schedule from ``sigmas`` (explicit), else ``preset`` (e.g. ``"lightx2v"``, which also sets
    its sampler and cfg 1), else ``steps``/``shift``/``denoise``; ``init_latent`` (normalised, same
    shape) is what a schedule starting below sigma 1 adds noise to; ``cfg_range`` /
    ``portrait_cfg_range`` are the guidance intervals and ``portrait_scales`` the per-range portrait
    scales of :class:`~.sampling.GuidanceSchedule`. ``batch_passes``: guidance passes per transformer
    forward (``None`` = all; see :class:`~fantasyportrait_core.model.denoiser.PortraitDenoiser`). ``device``:
    where the transformer computes (where the sampler runs; ``None``:
    :func:`~fantasyportrait_core.runtime.residency.compute_device`, which under block offload is the offload
    hook's onload device, never a weight's current device). ``resolved``: a
    :class:`~fantasyportrait_core.runtime.job.ResolvedSampling` (preset applied, schedules built once by the
    caller); when given, the loose sampling keywords above are not used.

    Raises:
        FloatingPointError: if the result holds NaN/Inf (never returned silently).
    """
    if resolved is None:
        from fantasyportrait_core.runtime.job import SamplingOptions

        resolved = SamplingOptions(steps, cfg, portrait_cfg, 1.0, shift, seed, sampler, preset, sigmas, denoise,
                                   cfg_range, portrait_cfg_range, portrait_scales).resolve()
    sampler, cfg, portrait_cfg = resolved.sampler, resolved.cfg, resolved.portrait_cfg
    schedule, guidance = resolved.schedule, resolved.guidance
    f_lat = latent_frames(num_frames)
    window = latent_frames(floor_to_4k1(context_frames)) if context_frames else f_lat
    if f_lat > window:
        overlap = min(max(1, context_overlap // 4), window - 1)
        denoiser = ContextWindowDenoiser(transformer, state, cond, portrait, cfg, portrait_cfg, window, overlap,
                                         anchor=window_anchor, guidance=guidance, batch_passes=batch_passes)
        log.info("[FantasyPortrait] %d frames: %d context windows of %d latent frames (anchor: %s)", num_frames,
                 len(denoiser.windows), window, window_anchor)
    else:
        denoiser = PortraitDenoiser(transformer, state, cond, portrait, cfg=cfg, portrait_cfg=portrait_cfg,
                                    guidance=guidance, batch_passes=batch_passes, device=device)
    noise = initial_noise(latent_shape(num_frames, width, height), seed)
    x = start_latent(noise, float(schedule[0]), init_latent).to(denoiser.device)
    out = sample(denoiser, x, schedule, sampler, seed=seed + 1, callback=callback).float().cpu()
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        raise FloatingPointError(f"sampling produced {bad} NaN/infinite latent value(s) of {out.numel()}: the weights or "
                                 f"conditions hold NaN, or fp16 overflowed (use bf16 weights)")
    return out


def frames_for(drivers: list[DrivingExpression], max_frames: int | None = None) -> int:
    """Frames to generate: the shortest driver, capped, floored to 4k+1 (reference ``find_replacement``)."""
    n = min(d.num_frames for d in drivers)
    if max_frames is not None:
        n = min(n, max_frames)
    n = floor_to_4k1(n)
    if n < 1:
        from fantasyportrait_core.validate import InputError

        raise InputError("no frame to generate: the driving video has no frames or frames was below 1")
    return n


__all__ = [
    "DrivingExpression", "ReferenceLayout", "StepInfo", "decode_latent", "encode_driving", "encode_reference_latent",
    "frames_for", "generate_latent", "generation_size", "on_device", "portrait_condition", "reference_layout",
    "resize_image", "assign_faces", "parse_face_order", "driver_embedding", "smooth_over_time", "ASSIGN_MODES",
    "one_euro_landmarks", "LANDMARK_FILTERS", "detect_reference", "face_numbers", "face_roles",
]

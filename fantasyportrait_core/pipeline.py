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
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from .adapter import floor_to_4k1, latent_frames, window_length, window_tokens
from .attention import PortraitCondition, PortraitState
from .context import ContextWindowDenoiser
from .denoiser import I2VConditioning, PortraitDenoiser, first_frame_mask
from .expression import align_face, encode_expressions
from .faces import Face, FaceTrack, detect_video, track_faces
from .masks import (TOKEN_STRIDE, box_masks, expand_box, latent_person_map, motion_range, pool_to_tokens,
                    token_person_ids)
from .models import denormalize_latent, normalize_latent
from .sampling import GuidanceSchedule, StepInfo, initial_noise, sample, schedule_sigmas, start_latent

log = logging.getLogger("FantasyPortrait")


@contextlib.contextmanager
def on_device(module: torch.nn.Module, device):
    """Put ``module`` on ``device`` for a stage and back where it was afterwards (frees VRAM between
    stages on small cards). Going back re-points each weight at the tensor it had before
    (:class:`~fantasyportrait_core.residency.WeightHome`): memory-mapped weights are not copied
    into RAM, as ``module.to("cpu")`` would."""
    from .residency import WeightHome

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
    """

    features: torch.Tensor
    track: FaceTrack
    crops: np.ndarray = field(repr=False, default=None)

    @property
    def num_frames(self) -> int:
        return self.features.shape[0]


def encode_driving(detector, encoder, frames: np.ndarray, people: int = 1, smooth: float = 0.0) -> list[DrivingExpression]:
    """Expression features of the ``people`` most present faces of a driving video.

    Every frame gets features: where a face is missing its landmarks are interpolated from the
    nearest frames with a face (listed in ``track.missing``), so the length always equals the
    frame count.

    Args:
        detector: face detector (``detect(image) -> list[Face]``).
        encoder: :class:`~fantasyportrait_core.expression.FanEncoder`.
        frames: uint8 ``[F, H, W, 3]`` RGB.
        people: characters to take from this video (left to right).
        smooth: Gaussian sigma in frames applied to the landmarks before alignment (0 = off);
            ~1 removes detector jitter from the crops without lagging real motion much.
    Returns:
        ``people`` :class:`DrivingExpression`, left to right.
    Raises:
        ValueError: no face in any frame, or fewer faces than ``people`` (names both counts).
    """
    frames = np.asarray(frames)
    per_frame = detect_video(detector, frames)
    tracks = track_faces(per_frame, max_people=people)
    if len(tracks) < people:
        raise ValueError(f"the driving video shows {len(tracks)} face(s) but {people} character(s) were asked of it")
    out = []
    for track in tracks:
        landmarks = smooth_over_time(track.landmarks, smooth) if smooth > 0 else track.landmarks
        crops = np.stack([align_face(frame, lm) for frame, lm in zip(frames, landmarks)])
        out.append(DrivingExpression(encode_expressions(encoder, crops), track, crops))
        if track.missing:
            log.warning("[FantasyPortrait] no face in %d driving frame(s) %s; filled from neighbouring frames",
                        len(track.missing), _short(track.missing))
    return out


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


def assign_faces(faces: list[Face], count: int, order: list[int] | None = None, mode: str = "left_to_right",
                 driver_embeddings: list[np.ndarray | None] | None = None) -> list[Face]:
    """Pick the reference face each of ``count`` characters animates; never by file order.

    Modes (``faces`` come sorted left to right): ``left_to_right`` — character i takes the i-th
    face from the left (one character: the largest face); ``right_to_left``; ``largest_first`` —
    character i takes the i-th largest face; ``identity`` — the assignment maximising the total
    cosine similarity between each character's driving-face embedding and the reference faces'
    embeddings (backends with embeddings, e.g. insightface). ``order[i]`` (0-based index into the
    left-to-right faces) overrides everything.

    Raises:
        ValueError: no face, fewer faces than characters (names both counts), a bad ``order``,
            an unknown mode, or identity mode without embeddings.
    """
    if not faces:
        raise ValueError("no face found in the reference image; use a clearer, larger or more frontal face")
    if len(faces) < count:
        raise ValueError(f"the reference image shows {len(faces)} face(s) but {count} driving expression "
                         f"sequence(s) were given; give at most {len(faces)}")
    if order:
        if len(order) != count or len(set(order)) != count or not all(0 <= i < len(faces) for i in order):
            raise ValueError(f"face order {order} must list {count} distinct face indices between 0 and {len(faces) - 1}")
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
            raise ValueError("identity assignment needs identity embeddings for the reference and driving faces: "
                             "use the insightface face detector")
        sim = np.array([[float(np.dot(d, f.embedding) / (np.linalg.norm(d) * np.linalg.norm(f.embedding) + 1e-9))
                         for f in faces] for d in driver_embeddings])
        best = max(itertools.permutations(range(len(faces)), count), key=lambda p: sum(sim[i, j] for i, j in enumerate(p)))
        return [faces[j] for j in best]
    raise ValueError(f"unknown assignment mode {mode!r}; choose one of {ASSIGN_MODES}")


def parse_face_order(text: str | None, name: str = "face_order") -> list[int] | None:
    """``"1,0"`` -> ``[1, 0]``; empty -> ``None`` (use the assignment mode). ``name`` is the input
    the text came from, for the error message.

    Raises:
        ValueError: for anything but comma-separated integers.
    """
    text = (text or "").strip()
    if not text:
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise ValueError(f"{name} '{text}' must be comma-separated face numbers like '1,0'") from None


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
        :class:`~fantasyportrait_core.attention.PortraitCondition` with windows on the adapter's device.
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
                    portrait_cfg: float = 4.0, shift: float = 5.0, callback=None, context_frames: int = 81,
                    context_overlap: int = 16, sampler: str = "euler", sigmas=None, preset: str | None = None,
                    denoise: float = 1.0, init_latent: torch.Tensor | None = None, cfg_range=(0.0, 1.0),
                    portrait_cfg_range=(0.0, 1.0), portrait_scales=(), batch_passes: int | None = None) -> torch.Tensor:
    """Sample a normalised Wan latent ``[1, 16, F_lat, H/8, W/8]`` (float32, CPU).

    Defaults are the shipped reference settings (30 steps, shift 5, cfg 1, portrait cfg 4, seed 42,
    Euler). Videos longer than ``context_frames`` pixel frames are denoised in overlapping context
    windows (:mod:`fantasyportrait_core.context`; overlap ``context_overlap`` pixel frames).
    ``callback(StepInfo)`` runs after each step and may raise to interrupt.

    Sampling options (:mod:`fantasyportrait_core.sampling`): ``sampler`` (:data:`~.sampling.SAMPLERS`);
    the schedule from ``sigmas`` (explicit), else ``preset`` (e.g. ``"lightx2v"``, which also sets
    its sampler and cfg 1), else ``steps``/``shift``/``denoise``; ``init_latent`` (normalised, same
    shape) is what a schedule starting below sigma 1 adds noise to; ``cfg_range`` /
    ``portrait_cfg_range`` are the guidance intervals and ``portrait_scales`` the per-range portrait
    scales of :class:`~.sampling.GuidanceSchedule`. ``batch_passes``: guidance passes per transformer
    forward (``None`` = all; see :class:`~fantasyportrait_core.denoiser.PortraitDenoiser`).
    """
    from .sampling import PRESETS

    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        sampler, cfg = PRESETS[preset].sampler, PRESETS[preset].cfg
    schedule = schedule_sigmas(steps, shift, denoise, sigmas, preset)
    guidance = GuidanceSchedule(schedule, cfg, portrait_cfg, cfg_range, portrait_cfg_range, portrait_scales)
    f_lat = latent_frames(num_frames)
    window = latent_frames(floor_to_4k1(context_frames))
    if f_lat > window:
        overlap = min(max(1, context_overlap // 4), window - 1)
        denoiser = ContextWindowDenoiser(transformer, state, cond, portrait, cfg, portrait_cfg, window, overlap,
                                         guidance=guidance, batch_passes=batch_passes)
        log.info("[FantasyPortrait] %d frames: %d context windows of %d latent frames", num_frames,
                 len(denoiser.windows), window)
    else:
        denoiser = PortraitDenoiser(transformer, state, cond, portrait, cfg=cfg, portrait_cfg=portrait_cfg,
                                    guidance=guidance, batch_passes=batch_passes)
    noise = initial_noise((1, 16, f_lat, height // 8, width // 8), seed)
    x = start_latent(noise, float(schedule[0]), init_latent).to(denoiser.device)
    return sample(denoiser, x, schedule, sampler, seed=seed + 1, callback=callback).float().cpu()


def frames_for(drivers: list[DrivingExpression], max_frames: int | None = None) -> int:
    """Frames to generate: the shortest driver, capped, floored to 4k+1 (reference ``find_replacement``)."""
    n = min(d.num_frames for d in drivers)
    if max_frames is not None:
        n = min(n, max_frames)
    n = floor_to_4k1(n)
    if n < 1:
        raise ValueError("the driving video has no frames")
    return n


__all__ = [
    "DrivingExpression", "ReferenceLayout", "StepInfo", "decode_latent", "encode_driving", "encode_reference_latent",
    "frames_for", "generate_latent", "generation_size", "on_device", "portrait_condition", "reference_layout",
    "resize_image", "assign_faces", "parse_face_order", "driver_embedding", "smooth_over_time", "ASSIGN_MODES",
]

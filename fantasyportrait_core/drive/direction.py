"""Directing a performance: per-channel strength over time, relative motion, the portrait's baseline.

The adapter is conditioned per frame on the four PD-FGC channels of the driving face (FantasyPortrait,
arXiv 2507.12956 §3.2; PD-FGC, Wang et al. CVPR 2023; layout: :data:`~.adapter.FEATURE_SPLIT`):

=============  =====  ==========================================================  =====================
channel        dims   what it carries (PD-FGC)                                    expression tokens
=============  =====  ==========================================================  =====================
``head_pose``  6      head pose (rotation and translation of the head)            1 (projection)
``eyes``       6      gaze direction and blinks                                   1 (projection)
``emotion``    30     the emotional expression (brows, cheeks, overall affect)    1 + 4 (emotion resampler)
``mouth``      512    lip motion (mouth shape, opening)                           1 + 16 (mouth resampler)
=============  =====  ==========================================================  =====================

Each channel is edited against the **baseline**, the features of the animated face in the reference
portrait itself (aligned as driving faces are, :func:`baseline_features`):

* ``absolute`` (the reference's behaviour): ``f = b + s·(d(t) − b)``;
* ``relative`` (as LivePortrait's relative motion): ``f = b + s·(d(t) − d(n))``, ``n`` the driver's
  neutral frame (first frame by default), so only the driver's *change* is transferred.

``s`` is a strength per channel in ``[0, 2]``: constant or keyframed piecewise-linearly over the
output frames (:class:`Strength`). In absolute mode ``s = 1`` returns the driver's features
unchanged, bit for bit (no arithmetic is done where ``s == 1``); ``s = 0`` holds the channel at the
portrait's own value (``head_pose`` 0: the expression without the head motion).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from fantasyportrait_core.model.adapter import EMOTION_TOKENS, EXPRESSION_DIM, FEATURE_SPLIT, MOUTH_TOKENS, PROJ_TOKENS
from fantasyportrait_core.validate import InputError, check_float

CHANNELS = ("head_pose", "eyes", "emotion", "mouth")
MOTION_MODES = ("absolute", "relative")
MAX_STRENGTH = 2.0


def _slices() -> dict[str, slice]:
    out, start = {}, 0
    for name, n in zip(CHANNELS, FEATURE_SPLIT):
        out[name] = slice(start, start + n)
        start += n
    return out


CHANNEL_SLICES = _slices()  # feature columns of each channel in the [F, 554] features

# Per-frame token indices each channel feeds (adapter.expression_tokens: 4 projection tokens in
# channel order, then 16 mouth tokens, then 4 emotion tokens).
_MOUTH0, _EMO0 = PROJ_TOKENS, PROJ_TOKENS + MOUTH_TOKENS
CHANNEL_TOKENS = {
    "head_pose": (0,),
    "eyes": (1,),
    "emotion": (2,) + tuple(range(_EMO0, _EMO0 + EMOTION_TOKENS)),
    "mouth": (3,) + tuple(range(_MOUTH0, _MOUTH0 + MOUTH_TOKENS)),
}


def check_channel(name: str, option: str) -> str:
    """``name`` if it is a channel; InputError naming ``option`` and the channels otherwise."""
    if name not in CHANNELS:
        raise InputError(f"{option}: unknown channel '{name}'; use one of {', '.join(CHANNELS)}")
    return name


def check_strength(value, option: str) -> float:
    """A strength as a float in ``[0, MAX_STRENGTH]`` (:func:`~fantasyportrait_core.validate.check_float`);
    InputError naming ``option`` otherwise."""
    return check_float(f"{option}: strength", value, 0.0, MAX_STRENGTH,
                       fix="0 holds the portrait's own value, 1 follows the driver, "
                           f"up to {MAX_STRENGTH:g} exaggerates")


@dataclass(frozen=True)
class Strength:
    """One channel's strength over the output frames: keys ``(frame, s)``, frames strictly
    increasing, ``s`` in ``[0, 2]``. Before the first key the first value holds, after the last key the
    last value; in between ``s`` is linear in the frame number. One key = a constant."""

    keys: tuple[tuple[int, float], ...] = ((0, 1.0),)

    @classmethod
    def constant(cls, s: float) -> "Strength":
        return cls(((0, float(s)),))

    @property
    def is_one(self) -> bool:
        return all(s == 1.0 for _, s in self.keys)

    @property
    def last_frame(self) -> int:
        return self.keys[-1][0]

    def values(self, num_frames: int) -> torch.Tensor:
        """float32 ``[num_frames]``: s at every frame (``np.interp``, computed in float64; a key
        value is returned exactly at its frame)."""
        frames = np.array([k for k, _ in self.keys], dtype=np.float64)
        vals = np.array([s for _, s in self.keys], dtype=np.float64)
        return torch.from_numpy(np.interp(np.arange(num_frames, dtype=np.float64), frames, vals).astype(np.float32))

    def describe(self) -> str:
        if len(self.keys) == 1:
            return f"{self.keys[0][1]:g}"
        return ", ".join(f"{f}:{s:g}" for f, s in self.keys)


def parse_keys(text: str, option: str = "keys") -> Strength:
    """``"0:1, 40:0.3, 80:1"`` (output frame : strength) -> :class:`Strength`; a bare number is a
    constant.

    Raises:
        InputError: unparsable text, a negative frame, frames not strictly increasing, s outside [0, 2].
    """
    text = (text or "").strip()
    if not text:
        raise InputError(f"{option} is empty; give FRAME:S pairs like '0:1, 40:0.3, 80:1' or one strength")
    if ":" not in text:
        return Strength.constant(check_strength(text, option))
    keys = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        m = re.fullmatch(r"(-?\d+)\s*:\s*(\S+)", part)
        if not m:
            raise InputError(f"{option}: '{part}' is not FRAME:S; write keys like '0:1, 40:0.3, 80:1' (output frame "
                             f"numbers from 0)")
        frame = int(m.group(1))
        if frame < 0:
            raise InputError(f"{option}: frame {frame} is negative; output frames count from 0")
        if keys and frame <= keys[-1][0]:
            raise InputError(f"{option}: key frames must increase ('{keys[-1][0]}' then '{frame}'); list the keys in "
                             f"frame order, each frame once")
        keys.append((frame, check_strength(m.group(2), option)))
    return Strength(tuple(keys))


@dataclass(frozen=True)
class Direction:
    """How one character's driving features are turned into the features the adapter sees.

    Attributes:
        strengths: channel -> :class:`Strength` (a channel not listed follows the driver, s = 1).
        motion: ``"absolute"`` or ``"relative"`` (see the module docstring).
        neutral_frame: the driver's frame taken as neutral in relative mode (0 = the first).
    """

    strengths: dict = field(default_factory=dict)
    motion: str = "absolute"
    neutral_frame: int = 0

    def __post_init__(self):
        for ch, s in self.strengths.items():
            check_channel(ch, "strength")
            if not isinstance(s, Strength):
                raise TypeError(f"strength of {ch} must be a Strength, got {type(s).__name__}")
        if self.motion not in MOTION_MODES:
            raise InputError(f"motion '{self.motion}' is unknown; use absolute (follow the driver) or relative "
                             f"(transfer the driver's change from its neutral frame)")
        if not isinstance(self.neutral_frame, (int, np.integer)) or self.neutral_frame < 0:
            raise InputError(f"neutral frame {self.neutral_frame!r} must be a frame number from 0")

    def strength(self, channel: str) -> Strength:
        return self.strengths.get(channel, Strength())

    @property
    def is_identity(self) -> bool:
        """True when applying it returns the driver unchanged (absolute, every s = 1)."""
        return self.motion == "absolute" and all(self.strength(c).is_one for c in CHANNELS)

    def check(self, num_frames: int, name: str = "the driving expression") -> None:
        """Keys and the neutral frame must lie inside the ``num_frames`` output frames.

        Raises:
            InputError: naming the channel or the neutral frame and the fix.
        """
        for ch in CHANNELS:
            last = self.strength(ch).last_frame
            if last >= num_frames:
                raise InputError(f"strength keys of {ch}: key at frame {last} is outside {name} ({num_frames} frames, "
                                 f"0..{num_frames - 1}); move the key inside or generate more frames")
        if self.motion == "relative" and self.neutral_frame >= num_frames:
            raise InputError(f"neutral frame {self.neutral_frame} is outside {name} ({num_frames} frames); pick a "
                             f"frame from 0 to {num_frames - 1}")

    def apply(self, features: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
        """Directed features.

        Args:
            features: float ``[F, 554]`` the driver's features (headpose, eye, emotion, mouth).
            baseline: float ``[554]`` the portrait's own features (:func:`baseline_features`).
        Returns:
            ``[F, 554]`` same dtype; ``features`` itself when :attr:`is_identity`. Absolute mode:
            ``b + s·(d − b)`` per channel, and exactly ``d`` where ``s == 1``; relative mode:
            ``b + s·(d − d[neutral_frame])``.
        Raises:
            InputError: keys or the neutral frame outside the ``F`` frames (:meth:`check`).
            ValueError: wrong shapes.
        """
        if features.ndim != 2 or features.shape[1] != EXPRESSION_DIM:
            raise ValueError(f"features must be [F, {EXPRESSION_DIM}], got {tuple(features.shape)}")
        baseline = baseline.reshape(-1).to(features)
        if baseline.shape[0] != EXPRESSION_DIM:
            raise ValueError(f"baseline must be [{EXPRESSION_DIM}], got {tuple(baseline.shape)}")
        if self.is_identity:
            return features
        n = features.shape[0]
        self.check(n)
        out = features.clone()
        anchor = features[self.neutral_frame] if self.motion == "relative" else baseline
        for ch in CHANNELS:
            sl = CHANNEL_SLICES[ch]
            s = self.strength(ch).values(n).to(features)[:, None]  # [F, 1]
            edited = baseline[sl] + s * (features[:, sl] - anchor[sl])
            if self.motion == "absolute":
                edited = torch.where(s == 1.0, features[:, sl], edited)
            out[:, sl] = edited
        return out

    def describe(self) -> str:
        parts = [f"{c}={self.strength(c).describe()}" for c in CHANNELS if not self.strength(c).is_one]
        text = ", ".join(parts) or "all channels 1"
        if self.motion == "relative":
            text += f", relative to frame {self.neutral_frame}"
        return text


# ----------------------------------------------------------------------------------------------
# Baseline: the portrait's own expression


@torch.no_grad()
def baseline_features(encoder, image: np.ndarray, faces: list) -> torch.Tensor:
    """PD-FGC features of faces of the reference portrait: the values ``s = 0`` holds.

    Each face is aligned exactly as a driving face is (:func:`~.expression.align_face` on its 5
    landmarks into the 224×224 template; the One-Euro landmark filter leaves a single frame
    unchanged) and encoded in one batch (:func:`~.expression.encode_expressions`).

    Args:
        encoder: :class:`~.expression.FanEncoder`.
        image: uint8 ``[H, W, 3]`` RGB, the image the faces' pixels refer to.
        faces: :class:`~.faces.Face` objects (``landmarks [5, 2]`` pixels).
    Returns:
        float32 ``[N, 554]`` on the CPU, one row per face.
    """
    from fantasyportrait_core.model.expression import align_face, encode_expressions

    crops = np.stack([align_face(image, np.asarray(f.landmarks, dtype=np.float64)) for f in faces])
    return encode_expressions(encoder, crops)


def direct(driver, direction: Direction, baseline: torch.Tensor):
    """A copy of a :class:`~.drive.encode.DrivingExpression` with directed features (the same object when
    ``direction`` changes nothing)."""
    if direction.is_identity:
        return driver
    return dataclasses.replace(driver, features=direction.apply(driver.features, baseline))


# ----------------------------------------------------------------------------------------------
# Command-line specs: CHANNEL=S[,...], CHANNEL=FRAME:S[,...], with an optional "C:" character prefix


_PREFIX = re.compile(r"^\s*(\d+)\s*:\s*(?=[A-Za-z])")


def _split_character(text: str) -> tuple[int | None, str]:
    m = _PREFIX.match(text)
    return (int(m.group(1)), text[m.end():]) if m else (None, text)


def parse_strength_arg(text: str, option: str = "--strength") -> tuple[int | None, dict[str, Strength]]:
    """``"head_pose=0,mouth=1.5"`` or ``"1:mouth=1.5"`` -> ``(character or None, {channel: Strength})``.

    Raises:
        InputError: unknown channel, missing ``=``, strength not a number in [0, 2].
    """
    character, body = _split_character(text)
    out = {}
    for part in [p.strip() for p in body.split(",") if p.strip()]:
        if "=" not in part:
            raise InputError(f"{option} '{text}': '{part}' is not CHANNEL=S; write e.g. head_pose=0,mouth=1.5 "
                             f"(channels: {', '.join(CHANNELS)})")
        ch, s = (t.strip() for t in part.split("=", 1))
        out[check_channel(ch, f"{option} '{text}'")] = Strength.constant(check_strength(s, f"{option} '{text}'"))
    if not out:
        raise InputError(f"{option} is empty; write e.g. head_pose=0,mouth=1.5")
    return character, out


def parse_keys_arg(text: str, option: str = "--strength-keys") -> tuple[int | None, str, Strength]:
    """``"mouth=0:1,40:0.3,80:1"`` or ``"1:mouth=0:1,40:0.3"`` -> ``(character or None, channel, Strength)``.

    Raises:
        InputError: unknown channel, bad keys (see :func:`parse_keys`).
    """
    character, body = _split_character(text)
    if "=" not in body:
        raise InputError(f"{option} '{text}' is not CHANNEL=FRAME:S[,FRAME:S...]; write e.g. mouth=0:1,40:0.3,80:1")
    ch, keys = (t.strip() for t in body.split("=", 1))
    check_channel(ch, f"{option} '{text}'")
    return character, ch, parse_keys(keys, f"{option} '{text}'")


def _per_character(values: list[str], option: str, characters: int, parse) -> list[list]:
    """Parse each value of a repeatable option and give each character the items addressed to it
    (no prefix: every character), in the order given."""
    out = [[] for _ in range(characters)]
    for text in values or []:
        c, item = parse(text)
        if c is not None and c >= characters:
            raise InputError(f"{option} '{text}' addresses character {c} but there are {characters} character(s) "
                             f"(numbered 0 to {characters - 1}); fix the 'C:' prefix")
        for i in ([c] if c is not None else range(characters)):
            out[i].append(item)
    return out


def directions_from_args(characters: int, strength=(), strength_keys=(), motion=(), neutral_frame=()) -> list[Direction]:
    """One :class:`Direction` per character from the CLI's repeatable options.

    ``--strength CHANNEL=S[,...]``, ``--strength-keys CHANNEL=FRAME:S[,...]``, ``--motion
    absolute|relative``, ``--neutral-frame N``; each may carry a ``C:`` prefix (``1:mouth=1.5``) that
    addresses character C only; later values override earlier ones.

    Raises:
        InputError: one line naming the option (see the parsers) or a character that does not exist.
    """
    s = _per_character(strength, "--strength", characters, lambda t: parse_strength_arg(t))
    k = _per_character(strength_keys, "--strength-keys", characters,
                       lambda t: (lambda c, ch, st: (c, {ch: st}))(*parse_keys_arg(t)))

    def parse_motion(t):
        c, body = _split_character(t)
        body = body.strip()
        if body not in MOTION_MODES:
            raise InputError(f"--motion '{t}': use absolute or relative (optionally C:relative for character C)")
        return c, body

    def parse_neutral(t):
        m = re.fullmatch(r"\s*(?:(\d+)\s*:\s*)?(-?\d+)\s*", str(t))
        if not m or int(m.group(2)) < 0:
            raise InputError(f"--neutral-frame '{t}' must be a frame number from 0 (or C:N for character C)")
        return (int(m.group(1)) if m.group(1) is not None else None), int(m.group(2))

    mo = _per_character(motion, "--motion", characters, parse_motion)
    ne = _per_character(neutral_frame, "--neutral-frame", characters, parse_neutral)
    out = []
    for i in range(characters):
        strengths = {}
        for item in s[i] + k[i]:
            strengths.update(item)
        out.append(Direction(strengths, mo[i][-1] if mo[i] else "absolute", ne[i][-1] if ne[i] else 0))
    return out


__all__ = ["CHANNELS", "CHANNEL_SLICES", "CHANNEL_TOKENS", "MAX_STRENGTH", "MOTION_MODES", "Direction", "Strength",
           "baseline_features", "check_channel", "check_strength", "direct", "directions_from_args", "parse_keys",
           "parse_keys_arg", "parse_strength_arg"]

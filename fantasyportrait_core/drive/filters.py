"""Temporal filters of landmark tracks: the reference tracker's adaptive One-Euro filter
(:func:`one_euro_landmarks`) and an optional Gaussian smoothing (:func:`smooth_over_time`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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

"""Expression-fidelity metrics of one character: distances between driving and generated PD-FGC
features (:func:`feature_metrics`), correlation and error of the landmark curves
(:func:`curve_metrics`), identity similarity (:func:`identity_metrics`) and the overall score
(:func:`overall_score`); definitions and sources in :mod:`fantasyportrait_core.evaluation`."""

from __future__ import annotations

import numpy as np
import torch

from fantasyportrait_core.evaluation.measure import CURVES

# PD-FGC feature layout (:class:`~.expression.FanEncoder` output): headpose, eye, emotion, mouth.
POSE = slice(0, 6)
EXPRESSION = slice(12, 554)  # emotion 30 + mouth 512
EMOTION = slice(12, 42)
MOUTH = slice(42, 554)

# Floors of the "spread" a distance is divided by: below them a driver is considered static.
_CURVE_SPREAD_FLOOR = 0.01  # 1 % of the inter-ocular distance
_FEATURE_SPREAD_FLOOR = 1e-6


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two ``[F]`` curves; ``None`` when either is constant (undefined)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    da, db = a - a.mean(), b - b.mean()
    na, nb = np.sqrt((da * da).sum()), np.sqrt((db * db).sum())
    if na < 1e-12 or nb < 1e-12:
        return None
    return float(np.clip((da * db).sum() / (na * nb), -1.0, 1.0))


def curve_metrics(driving: np.ndarray, generated: np.ndarray) -> dict:
    """Agreement of two per-frame curves (eye openness, mouth opening, mouth width).

    * ``pearson``: Pearson correlation (1 = same shape over time; scale- and offset-free).
    * ``mae``: mean absolute error, in the curve's units (inter-ocular distances): FantasyPortrait
      §4 measures eye motion by such an MAE.
    * ``relative``: ``mae / spread``, spread = mean absolute deviation of the driving curve from its
      mean (floored at 0.01 IOD: a static driver).
    * ``score``: ``1 / (1 + relative)``.

    Args:
        driving, generated: float ``[F]``, same length.
    Raises:
        ValueError: if the lengths differ.
    """
    d, g = np.asarray(driving, np.float64), np.asarray(generated, np.float64)
    if d.shape != g.shape:
        raise ValueError(f"curves differ in length: driving {d.shape}, generated {g.shape}")
    mae = float(np.abs(g - d).mean())
    spread = max(float(np.abs(d - d.mean()).mean()), _CURVE_SPREAD_FLOOR)
    rel = mae / spread
    return {"pearson": pearson(d, g), "mae": mae, "relative": rel, "score": 1.0 / (1.0 + rel)}


def feature_metrics(driving: torch.Tensor, generated: torch.Tensor, part: slice) -> dict:
    """AED/APD-style distance of PD-FGC features (``part``: :data:`EXPRESSION` or :data:`POSE`).

    * ``distance``: mean over frames of ``||g_t - d_t||_2`` on the features in ``part``.
    * ``relative``: ``distance / spread``, spread = mean over frames of ``||d_t - mean_t d||_2``
      (how far the driver moves from its own average): 1 = no closer than a frozen average face.
    * ``score``: ``1 / (1 + relative)``; ``per_frame``: the relative per-frame distances (plot).

    Args:
        driving, generated: float ``[F, 554]``.
    """
    d, g = driving[:, part].double(), generated[:, part].double()
    per_frame = (g - d).norm(dim=1)
    spread = max(float((d - d.mean(0)).norm(dim=1).mean()), _FEATURE_SPREAD_FLOOR)
    dist = float(per_frame.mean())
    rel = dist / spread
    return {"distance": dist, "relative": rel, "score": 1.0 / (1.0 + rel),
            "per_frame": (per_frame / spread).numpy()}


def identity_metrics(reference: np.ndarray | None, generated: np.ndarray) -> dict | str:
    """Cosine similarity of ArcFace embeddings ``generated [K, D]`` to ``reference [D]``: mean and
    minimum over the frames where the face was detected; a "not measured" string without embeddings."""
    if reference is None or generated.size == 0:
        return "not measured: needs identity embeddings (insightface face detector)"
    r = reference / (np.linalg.norm(reference) + 1e-12)
    g = generated / (np.linalg.norm(generated, axis=1, keepdims=True) + 1e-12)
    cos = g @ r
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "frames": int(len(cos))}


def overall_score(character: dict) -> float:
    """One number in (0, 1] for a character: the mean of the ``score`` of every motion metric that
    was measured (expression, head_pose, eye_openness, mouth_opening, mouth_width), each
    ``1 / (1 + relative error)``. 1 exactly when every curve and feature matches; 0.5 when the
    errors are as large as the driver's own movement. Identity is reported but not included (it is
    about appearance, not motion)."""
    scores = [character[k]["score"] for k in ("expression", "head_pose", *CURVES) if isinstance(character.get(k), dict)]
    return float(np.mean(scores))

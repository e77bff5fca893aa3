"""A generated video against its driving video(s), end to end: every character measured
(:mod:`.measure`), matched (:mod:`.match`) and scored (:mod:`.metrics`) into one
:class:`Evaluation` (:func:`compare`, :func:`evaluate`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from fantasyportrait_core.evaluation.measure import (CURVES, FaceMotion, make_mesh_landmarker, measure_driving,
                                                     measure_generated)
from fantasyportrait_core.evaluation.metrics import (EMOTION, EXPRESSION, MOUTH, POSE, curve_metrics,
                                                     feature_metrics, identity_metrics, overall_score)
from fantasyportrait_core.faces.assign import ASSIGN_MODES

log = logging.getLogger("FantasyPortrait")


@dataclass
class Evaluation:
    """Result of :func:`compare` / :func:`evaluate`: ``report`` (JSON-ready dict) and the per-frame
    curves to plot (``series[character][metric] = (driving [F], generated [F])``, or
    ``(None, relative distance [F])`` for the PD-FGC metrics)."""

    report: dict
    series: list[dict]


def compare(drivers: list[FaceMotion], generated: list[FaceMotion], reference_embeddings: list | None = None) -> Evaluation:
    """Metrics of each generated face against its driver, frame by frame.

    Args:
        drivers, generated: one :class:`~.measure.FaceMotion` per character, same order, same frame count.
        reference_embeddings: per character the identity target embedding (``None`` entries: the
            generated face's own first embedding).
    Returns:
        :class:`Evaluation` (report without the run information :func:`evaluate` adds).
    Raises:
        ValueError: different character or frame counts.
    """
    if len(drivers) != len(generated) or not drivers:
        raise ValueError(f"{len(drivers)} driver(s) for {len(generated)} generated face(s)")
    characters, series = [], []
    for i, (d, g) in enumerate(zip(drivers, generated)):
        if len(d) != len(g):
            raise ValueError(f"character {i}: {len(d)} driving frames vs {len(g)} generated frames")
        ch = {"character": i, "generated_face_box": [round(float(v), 1) for v in g.track.boxes[0]],
              "frames_without_face": {"driving": d.track.missing, "generated": g.track.missing}}
        plot_data = {}
        if d.features is not None and g.features is not None:
            for key, part in (("expression", EXPRESSION), ("head_pose", POSE)):
                m = feature_metrics(d.features, g.features, part)
                plot_data[key] = (None, m.pop("per_frame"))
                ch[key] = m
            ch["expression"]["emotion_distance"] = feature_metrics(d.features, g.features, EMOTION)["distance"]
            ch["expression"]["mouth_feature_distance"] = feature_metrics(d.features, g.features, MOUTH)["distance"]
        else:
            ch["expression"] = ch["head_pose"] = "not measured: needs the PD-FGC expression encoder"
        for key in CURVES:
            ch[key] = curve_metrics(d.curves[key], g.curves[key])
            plot_data[key] = (d.curves[key], g.curves[key])
        ref = reference_embeddings[i] if reference_embeddings else None
        if ref is None and g.embeddings.size:
            ref = g.embeddings[0]
        ch["identity"] = identity_metrics(ref, g.embeddings)
        ch["overall"] = overall_score(ch)
        characters.append(ch)
        series.append(plot_data)
    report = {"characters": characters, "overall": float(np.mean([c["overall"] for c in characters]))}
    return Evaluation(report, series)


def reference_embeddings(detector, reference: np.ndarray, generated: list[FaceMotion],
                         generated_size: tuple[int, int]) -> list:
    """Per character, the embedding of the reference-image face nearest its generated face (boxes
    scaled to the generated ``(width, height)``); ``None`` where the detector gives no embedding."""
    faces = detector.detect(np.asarray(reference))
    if not faces:
        raise ValueError("no face found in the reference image")
    sx, sy = generated_size[0] / reference.shape[1], generated_size[1] / reference.shape[0]
    out = []
    for g in generated:
        box = g.track.boxes[0]
        centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        out.append(min(faces, key=lambda f: np.linalg.norm(f.center * [sx, sy] - centre)).embedding)
    return out


def evaluate(detector, driving: list[np.ndarray], generated: np.ndarray, people: int | None = None, encoder=None,
             reference: np.ndarray | None = None, assign: str = "left_to_right", face_order: list[int] | None = None,
             landmarks: str = "auto", encoder_random: bool = False) -> Evaluation:
    """Expression-fidelity metrics of ``generated`` against its driving video(s).

    Args:
        detector: a face detector (:func:`~fantasyportrait_core.faces.detect.make_detector`); its embeddings, if any
            (insightface), give the identity metric.
        driving: one uint8 ``[F, H, W, 3]`` RGB clip per character, or one clip showing ``people``
            characters; all at the generated video's frame rate (:func:`~.match.resample_frames`).
        generated: uint8 ``[G, H', W', 3]`` RGB; frame ``i`` is compared with driving frame ``i``
            over the first ``min(F, G)`` frames.
        people: characters (default: one per driving clip).
        encoder: PD-FGC :class:`~.expression.FanEncoder` (``None``: expression and head pose are
            "not measured").
        reference: optional uint8 ``[H, W, 3]`` reference image: the identity target (else the
            generated face in the first frame).
        assign, face_order: how generation paired characters with faces (:func:`~.faces.assign.assign_faces`).
        landmarks: ``auto`` (Face Mesh if mediapipe ships it, else the crop measurement),
            ``mesh`` or ``crop``.
        encoder_random: the encoder has random weights: the report says PD-FGC values are not meaningful.
    Returns:
        :class:`Evaluation`; ``report["seconds"]`` has the time of each stage.
    Raises:
        ValueError: empty or mismatched inputs, no face, fewer faces than characters (names the counts).
    """
    driving = [np.asarray(v) for v in driving]
    generated = np.asarray(generated)
    if not driving:
        raise ValueError("no driving video given")
    for name, v in [("generated", generated)] + [(f"driving #{i}", v) for i, v in enumerate(driving)]:
        if v.ndim != 4 or v.shape[-1] != 3 or v.dtype != np.uint8 or len(v) == 0:
            raise ValueError(f"{name} frames must be uint8 [F>0, H, W, 3] RGB, got {v.dtype} {v.shape}")
    if assign not in ASSIGN_MODES:
        raise ValueError(f"unknown assignment {assign!r}; choose one of {ASSIGN_MODES}")
    n = min(len(generated), *(len(v) for v in driving))
    if len(generated) > n:
        log.warning("[FantasyPortrait] evaluation: the generated video has %d frames, its driver only %d; "
                    "the last %d generated frames are not compared", len(generated), n, len(generated) - n)
    clips = [v[:n] for v in driving]
    gen = generated[:n]
    seconds = {}
    mesh = make_mesh_landmarker(landmarks)
    try:
        t = time.perf_counter()
        d_motion = measure_driving(detector, clips, people, encoder, mesh)
        seconds["driving"] = time.perf_counter() - t
        t = time.perf_counter()
        g_motion = measure_generated(detector, gen, len(d_motion), encoder, mesh, assign, face_order,
                                     [np.mean(d.embeddings, axis=0) if d.embeddings.size else None for d in d_motion])
        seconds["generated"] = time.perf_counter() - t
        refs = None
        if reference is not None:
            refs = reference_embeddings(detector, reference, g_motion, (gen.shape[2], gen.shape[1]))
    finally:
        if mesh is not None:
            mesh.close()
    ev = compare(d_motion, g_motion, refs)
    ev.report = {
        "frames_compared": int(n),
        "frames_ignored": {"generated": int(len(generated) - n), "driving": [int(len(v) - n) for v in driving]},
        "landmarks": "mesh (MediaPipe Face Mesh)" if mesh is not None else "crop (5 landmarks + aligned crop)",
        "expression_encoder": ("none" if encoder is None else
                               "RANDOM weights: expression/head_pose values are not meaningful" if encoder_random
                               else "PD-FGC"),
        "identity_target": "reference image" if reference is not None else "first generated frame",
        **ev.report,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    return ev

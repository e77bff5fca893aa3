"""Face detector benchmark: recall, false positives and CPU time per frame for each backend on the
shared images and videos and on crowded 1280×720 scenes composed from the shared faces; landmark
agreement between backends.

    python benchmarks/bench_detectors.py                         # every installed backend
    python benchmarks/bench_detectors.py --backends mtcnn,mediapipe --every 3 --mtcnn 20,12
    python benchmarks/bench_detectors.py --tiny                  # smoke test (4 frames + the crowd scene)
    python benchmarks/bench_detectors.py --detector-dir ../shared/models/fantasyportrait_official \
        --every 6 --threads 1                                    # with the official pair (docs/DETECTORS.md)

Ground truth (counted by looking at the frames; see docs/DETECTORS.md):
* man.jpeg, jgz.mp4, biden.mp4, trump.mp4: one face; two_person.png / two_person.mp4: two people,
  both visible in every frame. Single-face inputs: the best detection is the face, any other box
  is a false positive. Two people: hand-labelled head regions (checked on 5 frames per clip); a
  detection counts for a person when its centre lies in that person's region, one per person per
  frame, anything else is a false positive.
* Crowded scenes: faces cut from the shared inputs (face boxes checked by eye, below) with an
  elliptical feathered edge and pasted onto a seeded noisy gradient. ``group ×s``: a row of the 6
  faces (150 px wide at ×1) pasted at scale s; ``crowd 15-300 px``: 12 faces whose widths run from
  300 down to 15 px. A detection is a hit when its centre lies in a true face box and its width is
  within 0.5–2× of it (one hit per face); anything else is a false positive.
* Scenes with 3 and 4 people (:func:`compose_people`): ``3 people``: two_person.png with man.jpeg
  (scaled to the same height) pasted to its right, 1694×610; ``4 people``: 2×2 tiles of 480² from
  man.jpeg and frames of jgz / biden / trump, 960×960. Truth: the two_person.png regions plus one
  region per tile.

Landmarks (when the official pair is measured): the official pair's 5 points are the reference;
each other backend's 5 points on the faces both found, split by the official head pose into frontal
(|yaw| < 20°) and turned faces: the distance per point in inter-pupil distances and in pixels, and
the crop shift: where the official 5 points land in the 224² PD-FGC crop aligned from the other
backend's points, against where they land in the official crop (the template), mean over the 5
points, in crop pixels.

Times are wall-clock per frame on this machine's CPU (torch threads as printed), after one warm-up
call; mtcnn runs each clip in batches of 16 frames (``faces.detect_video``), mediapipe frame by frame.
Backends whose package or weights are missing get a "not measured" row saying why.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fantasyportrait_core.faces import detect as D  # noqa: E402
from fantasyportrait_core.model.expression import ALIGN_TEMPLATE, CROP_SIZE, umeyama  # noqa: E402
from fantasyportrait_core.faces.face import detect_video, order_points  # noqa: E402
from fantasyportrait_core.media.video import read_image, read_video  # noqa: E402

# Face boxes (x1, y1, x2, y2) in the shared inputs, for cutting faces out (checked by eye).
SOURCE_FACES = [
    ("man.jpeg", None, (359, 237, 690, 679)),
    ("two_person.png", None, (272, 69, 417, 269)),
    ("two_person.png", None, (801, 133, 944, 326)),
    ("jgz.mp4", 0, (168, 68, 336, 323)),
    ("biden.mp4", 0, (133, 51, 342, 352)),
    ("trump.mp4", 0, (147, 81, 339, 347)),
    ("two_person.mp4", 0, (383, 85, 557, 318)),
    ("two_person.mp4", 0, (727, 268, 866, 444)),
]
GROUP = [0, 1, 2, 3, 4, 6]  # the 6 faces of the group row
GROUP_SCALES = (1.0, 0.5, 0.25, 0.15)
CROWD_WIDTHS = (300, 220, 160, 120, 90, 64, 48, 36, 28, 22, 18, 15)

# Head regions (x1, y1, x2, y2) of each person where one input shows several (hand-labelled).
REGIONS = {
    "two_person.png": [(150, 0, 560, 420), (560, 0, 1084, 450)],
    "two_person.mp4": [(250, 0, 640, 450), (640, 100, 1050, 500)],
}
INPUTS = [("man.jpeg", 1), ("two_person.png", 2), ("two_person.mp4", 2), ("jgz.mp4", 1), ("biden.mp4", 1),
          ("trump.mp4", 1)]


# ------------------------------------------------------------------------------ crowded scenes

def _background(w=1280, h=720, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([90 + 60 * x / w, 100 + 40 * y / h, 120 - 30 * x / w], -1)
    noise = cv2.GaussianBlur(rng.normal(0, 25, (h, w, 3)).astype(np.float32), (0, 0), 3)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _head(data, idx):
    """(head crop, face box inside it) for SOURCE_FACES[idx]: the face box grown to 1.2× its width
    and 1.3× its height, clipped to the image."""
    name, frame, (x1, y1, x2, y2) = SOURCE_FACES[idx]
    path = os.path.join(data, name)
    img = read_image(path) if frame is None else read_video(path, max_frames=frame + 1).frames[frame]
    w, h = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    X1, Y1 = int(max(cx - 0.6 * w, 0)), int(max(cy - 0.65 * h, 0))
    X2, Y2 = int(min(cx + 0.6 * w, img.shape[1])), int(min(cy + 0.65 * h, img.shape[0]))
    return img[Y1:Y2, X1:X2], np.array([x1 - X1, y1 - Y1, x2 - X1, y2 - Y1], float)


def _paste(canvas, head, face, x, y, face_width):
    """Paste ``head`` scaled so its face is ``face_width`` px wide, top-left at (x, y), with a
    feathered elliptical edge; returns the face box in the canvas."""
    k = face_width / (face[2] - face[0])
    hw, hh = max(2, round(head.shape[1] * k)), max(2, round(head.shape[0] * k))
    small = cv2.resize(head, (hw, hh), interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC)
    mask = np.zeros((hh, hw), np.float32)
    cv2.ellipse(mask, (hw // 2, hh // 2), (max(1, int(hw * 0.48)), max(1, int(hh * 0.48))), 0, 0, 360, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), max(0.5, 0.04 * hw))[..., None]
    region = canvas[y:y + hh, x:x + hw]
    region[:] = (mask * small + (1 - mask) * region).astype(np.uint8)
    return face * k + [x, y, x, y]


def compose_scenes(data) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, 1280×720 RGB image, true face boxes [N, 4]) for each crowded scene (deterministic)."""
    heads = [_head(data, i) for i in range(len(SOURCE_FACES))]
    scenes = []
    for s in GROUP_SCALES:
        canvas, boxes = _background(seed=1), []
        fw = 150 * s
        step = 1280 / len(GROUP)
        for j, i in enumerate(GROUP):
            head, face = heads[i]
            k = fw / (face[2] - face[0])
            x = int(j * step + (step - head.shape[1] * k) / 2) if s > 0.3 else int(400 + j * fw * 1.6)
            y = int(360 - head.shape[0] * k / 2)
            boxes.append(_paste(canvas, head, face, x, y, fw))
        scenes.append((f"group ×{s:g} (6 faces, {round(fw)} px)", canvas, np.array(boxes)))
    canvas, boxes = _background(seed=2), []
    left = 20  # the largest face on the left, the others shelf-packed to its right
    x, y, row_h = left, 20, 0
    for j, fw in enumerate(CROWD_WIDTHS):
        head, face = heads[j % len(heads)]
        k = fw / (face[2] - face[0])
        hw, hh = round(head.shape[1] * k), round(head.shape[0] * k)
        if x + hw > 1260:
            x, y, row_h = left, y + row_h + 30, 0
        if y + hh > 700:
            raise RuntimeError("crowd layout does not fit 1280x720")
        boxes.append(_paste(canvas, head, face, x, y, fw))
        x, row_h = x + hw + 30, max(row_h, hh)
        if j == 0:
            left, x, row_h = x, x, 0
    scenes.append((f"crowd {min(CROWD_WIDTHS)}-{max(CROWD_WIDTHS)} px ({len(CROWD_WIDTHS)} faces)", canvas,
                   np.array(boxes)))
    return scenes


def compose_people(data) -> list[tuple[str, np.ndarray, list]]:
    """(name, RGB image, head regions) of the 3- and 4-person scenes (deterministic; see the module doc)."""
    two = read_image(os.path.join(data, "two_person.png"))
    man = read_image(os.path.join(data, "man.jpeg"))
    h = two.shape[0]
    man_h = cv2.resize(man, (h, h), interpolation=cv2.INTER_AREA)
    three = np.hstack([two, man_h])
    w = two.shape[1]
    regions3 = REGIONS["two_person.png"] + [(w, 0, w + h, h)]
    tiles = [man] + [read_video(os.path.join(data, n), max_frames=k + 1).frames[k]
                     for n, k in (("jgz.mp4", 40), ("biden.mp4", 20), ("trump.mp4", 30))]
    tiles = [cv2.resize(t, (480, 480), interpolation=cv2.INTER_AREA) for t in tiles]
    four = np.vstack([np.hstack(tiles[:2]), np.hstack(tiles[2:])])
    regions4 = [(0, 0, 480, 480), (480, 0, 960, 480), (0, 480, 480, 960), (480, 480, 960, 960)]
    return [("3 people (two_person.png + man.jpeg)", three, regions3),
            ("4 people (2×2 tiles)", four, regions4)]


# -------------------------------------------------------------------------------- scoring

def match_boxes(faces, truth: np.ndarray) -> tuple[list[int | None], int]:
    """For each true box, the index of the detection that hits it (centre inside, width within
    0.5–2×; best score first), and the number of detections hitting nothing."""
    used, hit = set(), []
    order = sorted(range(len(faces)), key=lambda i: -faces[i].score)
    for t in truth:
        tw = t[2] - t[0]
        found = None
        for i in order:
            f = faces[i]
            cx, cy = f.center
            fw = f.box[2] - f.box[0]
            if i not in used and t[0] <= cx <= t[2] and t[1] <= cy <= t[3] and 0.5 * tw <= fw <= 2 * tw:
                found = i
                used.add(i)
                break
        hit.append(found)
    return hit, len(faces) - len(used)


def match_regions(faces, regions, people: int) -> tuple[list[int | None], int]:
    """Single-face inputs (``regions`` None): the best detection is the face. Otherwise the best
    detection whose centre lies in each person's region."""
    order = sorted(range(len(faces)), key=lambda i: -faces[i].score)
    if regions is None:
        hit = [order[0] if order else None]
        return hit, max(len(faces) - 1, 0)
    used, hit = set(), []
    for x1, y1, x2, y2 in regions[:people]:
        found = next((i for i in order if i not in used and x1 <= faces[i].center[0] <= x2
                      and y1 <= faces[i].center[1] <= y2), None)
        if found is not None:
            used.add(found)
        hit.append(found)
    return hit, len(faces) - len(used)


def run_detector(det, frames: np.ndarray) -> tuple[list, float]:
    """Detections per frame and seconds per frame (after one warm-up call)."""
    det.detect(frames[0])
    t = time.perf_counter()
    faces = detect_video(det, frames)
    return faces, (time.perf_counter() - t) / len(frames)


def landmark_gap(a, b) -> np.ndarray:
    """Per-point distance between two 5-point sets ``[5, 2]``, in units of b's inter-ocular distance."""
    iod = np.linalg.norm(b[1] - b[0])
    return np.linalg.norm(a - b, axis=1) / max(iod, 1e-6)


def crop_shift(five: np.ndarray, ref_five: np.ndarray, size: int = CROP_SIZE) -> float:
    """How far the face moves in the aligned ``size``² crop when it is aligned from ``five`` instead
    of ``ref_five``: mean distance, in crop pixels, between where the 5 points ``ref_five`` land
    under the two alignments (under ``ref_five``'s own they land near the template)."""
    m, mr = umeyama(five, ALIGN_TEMPLATE * size), umeyama(ref_five, ALIGN_TEMPLATE * size)
    a = ref_five @ m[:, :2].T + m[:, 2]
    b = ref_five @ mr[:, :2].T + mr[:, 2]
    return float(np.linalg.norm(a - b, axis=1).mean())


FRONTAL_YAW = 20.0  # degrees (official head pose); larger |yaw| counts as a turned face


def landmark_rows(found, clips, ref_label, labels):
    """Per (backend, view): (distances [N, 5] in inter-pupil units, distances in px, crop shifts [N], inputs)."""
    rows = {}
    for label in labels:
        for name, *_ in clips:
            if (name, label) not in found or (name, ref_label) not in found:
                continue
            for ra, rb in zip(found[name, label], found[name, ref_label]):
                for fa, fb in zip(ra, rb):
                    if fa is None or fb is None:
                        continue
                    view = "frontal" if abs(fb.pose[1]) < FRONTAL_YAW else "turned"
                    px = np.linalg.norm(fa.landmarks - fb.landmarks, axis=1)
                    iod = max(np.linalg.norm(fb.landmarks[1] - fb.landmarks[0]), 1e-6)
                    r = rows.setdefault((label, view), ([], [], [], set()))
                    r[0].append(px / iod)
                    r[1].append(px)
                    r[2].append(crop_shift(fa.landmarks, fb.landmarks))
                    r[3].add(name.split(" (")[0])
    return {k: (np.array(a), np.array(b), np.array(c), sorted(d)) for k, (a, b, c, d) in rows.items()}


# -------------------------------------------------------------------------------- main

def build_detectors(args) -> list[tuple[str, object, str]]:
    """(row label, detector or None, why not measured)."""
    out = []
    for backend in args.backends.split(","):
        if backend == "mtcnn":
            for spec in args.mtcnn.split(","):
                size, _, score = spec.partition(":")
                label = f"mtcnn min_face {size}" + (f" score {score}" if score else "")
                try:
                    out.append((label, D.make_detector("mtcnn", min_score=float(score or 0) or None,
                                                       min_face_size=int(size), device="cpu"), ""))
                except ImportError as e:
                    out.append((label, None, str(e)))
        elif backend == "official":
            files = [os.path.join(args.detector_dir, f) for f in D.OFFICIAL_FILES]
            if not all(os.path.isfile(f) for f in files):
                out.append(("official onnx", None, f"not measured: no {' / '.join(D.OFFICIAL_FILES)} in "
                                                   f"{args.detector_dir}"))
                continue
            try:
                out.append(("official onnx", D.make_detector("official", args.detector_dir,
                                                             threads=args.threads), ""))
            except ImportError as e:
                out.append(("official onnx", None, f"not measured: {e}"))
        else:
            try:
                out.append((backend, D.make_detector(backend), ""))
            except (ImportError, FileNotFoundError) as e:
                out.append((backend, None, f"not measured: {e}"))
    return out


def print_official_landmarks(found, clips, labels):
    rows = landmark_rows(found, clips, "official onnx", labels)
    if not rows:
        return
    print(f"\nLandmarks against the official pair (faces both found; frontal: official |yaw| < {FRONTAL_YAW:g}°). "
          "Distance of each point in official inter-pupil distances, mean / median / max; mean px; crop shift: "
          "mean distance the 5 points move in the 224² crop, mean / max in crop px\n")
    print("| backend | view | faces | eyes | nose | mouth corners | all 5 | all 5, px | crop shift (224² px) "
          "| inputs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    cell = lambda g: f"{g.mean():.3f} / {np.median(g):.3f} / {g.max():.2f}"  # noqa: E731
    for (label, view), (rel, px, shift, names) in sorted(rows.items()):
        print(f"| {label} | {view} | {len(rel)} | {cell(rel[:, :2])} | {cell(rel[:, 2])} | {cell(rel[:, 3:])} | "
              f"{cell(rel)} | {px.mean():.1f} | {shift.mean():.1f} / {shift.max():.1f} | {', '.join(names)} |")


def print_pairwise_landmarks(found, clips, measured):
    """Landmark agreement between mtcnn and the next measured backend, on faces both found."""
    pairs = [(a, b) for a in measured for b in measured if a.startswith("mtcnn") and not b.startswith("mtcnn")]
    if not pairs:
        return
    print("\nLandmark agreement: distance of the 5 points, in inter-ocular distances of the second backend, "
          "over faces both found: mean / median / max (profile views shrink that distance and inflate the "
          "mean)\n")
    print("| input | backends | faces | eyes | nose | mouth corners | all 5 |")
    print("|---|---|---|---|---|---|---|")
    for a, b in pairs[:1]:
        for name, *_ in clips:
            if (name, a) not in found or (name, b) not in found:
                continue
            gaps = np.array([landmark_gap(fa.landmarks, fb.landmarks)
                             for ra, rb in zip(found[name, a], found[name, b]) for fa, fb in zip(ra, rb)
                             if fa is not None and fb is not None]).reshape(-1, 5)
            if not len(gaps):
                continue
            cell = lambda g: f"{g.mean():.3f} / {np.median(g):.3f} / {g.max():.2f}"  # noqa: E731
            print(f"| {name} | {a} vs {b} | {len(gaps)} | {cell(gaps[:, :2])} | {cell(gaps[:, 2])} | "
                  f"{cell(gaps[:, 3:])} | {cell(gaps)} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
    ap.add_argument("--backends", default="mtcnn,mediapipe,official")
    ap.add_argument("--mtcnn", default="20", help="mtcnn settings to compare: min_face_size[:min_score],...")
    ap.add_argument("--detector-dir", default=os.path.join("models", "fantasyportrait"),
                    help="folder with the official face_det.onnx + face_landmark.onnx")
    ap.add_argument("--every", type=int, default=3, help="use every n-th video frame")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch and onnxruntime CPU threads (default: their own)")
    ap.add_argument("--dump", default=None, help="save the matched faces of every backend here (.npz)")
    ap.add_argument("--save-scenes", default=None, help="write the composed scenes (with true boxes) here")
    ap.add_argument("--inputs", choices=("all", "shared", "scenes"), default="all",
                    help="the shared images and videos, the composed scenes, or both")
    ap.add_argument("--tiny", action="store_true", help="smoke test: 4 frames of jgz.mp4 and the crowd scene")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = [("jgz.mp4", 1)] if args.tiny else INPUTS if args.inputs != "scenes" else []
    clips = []  # (name, frames, people, regions or truth boxes, kind)
    for name, people in inputs:
        path = os.path.join(args.data, name)
        if name.endswith(".mp4"):
            frames = read_video(path, max_frames=16 if args.tiny else None).frames[:: 4 if args.tiny else args.every]
        else:
            frames = read_image(path)[None]
        clips.append((name, frames, people, REGIONS.get(name), "regions"))
    if not args.tiny and args.inputs != "scenes":
        for name, image, regions in compose_people(args.data):
            clips.append((name, image[None], len(regions), regions, "regions"))
    scenes = compose_scenes(args.data) if args.inputs != "shared" else []
    if args.tiny:
        scenes = scenes[-1:]
    for name, image, boxes in scenes:
        clips.append((name, image[None], len(boxes), boxes, "boxes"))
        if args.save_scenes:
            os.makedirs(args.save_scenes, exist_ok=True)
            shown = image.copy()
            for b in np.round(boxes).astype(int):
                cv2.rectangle(shown, tuple(b[:2]), tuple(b[2:]), (0, 255, 0), 1)
            file = name.split(" (")[0].replace(" ", "_").replace("×", "x") + ".png"
            cv2.imwrite(os.path.join(args.save_scenes, file), cv2.cvtColor(shown, cv2.COLOR_RGB2BGR))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"numpy {np.__version__}, load average {load:.1f} at start; video frames: every {args.every}\n")
    dets = build_detectors(args)
    print("| input | size | frames × true faces | backend | recall | false positives | ms / frame |")
    print("|---|---|---|---|---|---|---|")
    found = {}  # (input, backend label) -> per frame, per person: Face or None
    for name, frames, people, truth, kind in clips:
        size = f"{frames.shape[2]}×{frames.shape[1]}"
        for label, det, why in dets:
            if det is None:
                continue
            faces, sec = run_detector(det, frames)
            hits, fps = [], 0
            for fr in faces:
                h, fp = match_boxes(fr, truth) if kind == "boxes" else match_regions(fr, truth, people)
                hits.append([None if i is None else fr[i] for i in h])
                fps += fp
            found[name, label] = hits
            n_hit = sum(f is not None for row in hits for f in row)
            recall = f"{n_hit}/{len(frames) * people} ({100 * n_hit / (len(frames) * people):.0f} %)"
            print(f"| {name} | {size} | {len(frames)} × {people} | {label} | {recall} | {fps} | {1000 * sec:.0f} |",
                  flush=True)
    for label, det, why in dets:
        if det is None:
            print(f"| all | – | – | {label} | {why} | – | – |")

    crowd = next((c for c in clips if c[0].startswith("crowd")), None)
    measured = [label for label, det, _ in dets if det is not None]
    if crowd is not None and measured:
        widths = np.round(crowd[3][:, 2] - crowd[3][:, 0]).astype(int)
        print(f"\n{crowd[0]}: which faces each backend found, by face width in px\n")
        print("| backend | " + " | ".join(str(w) for w in widths) + " |")
        print("|---|" + "---|" * len(widths))
        for label in measured:
            row = found[crowd[0], label][0]
            print(f"| {label} | " + " | ".join("found" if f is not None else "–" for f in row) + " |")

    if "official onnx" in measured:
        print_official_landmarks(found, clips, [m for m in measured if m != "official onnx"])
    else:  # no reference points: how far the offline backends are from each other
        print_pairwise_landmarks(found, clips, measured)
    if args.dump:
        dump = {}
        for (name, label), rows in found.items():
            for k, row in enumerate(rows):
                for j, f in enumerate(row):
                    if f is not None:
                        key = f"{label}|{name}|{k}|{j}"
                        dump[key + "|lm"] = f.landmarks
                        if f.pose is not None:
                            dump[key + "|pose"] = f.pose
        np.savez(args.dump, **dump)
    for _, det, _ in dets:
        if det is not None:
            det.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

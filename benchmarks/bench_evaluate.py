"""Cost of the expression-fidelity evaluation (``fantasyportrait_core.evaluation``), stage by stage.

    python benchmarks/bench_evaluate.py                      # 81 frames of biden.mp4 vs itself 2 frames later, CPU
    python benchmarks/bench_evaluate.py --frames 81 --device cuda
    python benchmarks/bench_evaluate.py --frames 3           # smoke run of the script itself

Both sides of one character are measured the way ``evaluate`` does it (MTCNN detection and
tracking; 224² alignment + PD-FGC encoder, random weights: same cost as the real ones; 448²
alignment; crop curves), then compared and plotted; a last row times ``evaluate()`` end to end.
Prints a markdown table of wall seconds and process CPU seconds per stage, with the machine's
load average: on a shared machine wall time grows with the load, CPU seconds much less.
Target (issue #15): 81 frames in under 10 s on CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fantasyportrait_core.evaluation.compare import compare, evaluate  # noqa: E402
from fantasyportrait_core.evaluation.measure import (FaceMotion, aligned_measure_crops, crop_curves,  # noqa: E402
                                                     mouth_width)
from fantasyportrait_core.evaluation.report import plot  # noqa: E402
from fantasyportrait_core.faces.mtcnn import MtcnnDetector  # noqa: E402
from fantasyportrait_core.model.expression import CROP_SIZE, FanEncoder, align_face, encode_expressions  # noqa: E402
from fantasyportrait_core.faces.face import detect_video, track_faces  # noqa: E402
from fantasyportrait_core.media.video import read_video  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", default=os.path.join(ROOT, "..", "shared", "data", "biden.mp4"))
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--shift", type=int, default=2, help="the 'generated' clip is the video this many frames later")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--min-face-size", type=int, default=0, help="MTCNN min face (0 = the CLI's: a tenth of the side)")
    args = ap.parse_args(argv)

    video = read_video(args.video, max_frames=args.frames + args.shift)
    if len(video) < args.frames + args.shift:
        raise SystemExit(f"{args.video} has {len(video)} frames; need {args.frames + args.shift}")
    driving, generated = video.frames[:args.frames], video.frames[args.shift:args.shift + args.frames]
    mfs = args.min_face_size or max(20, min(driving.shape[1:3]) // 10)
    det = MtcnnDetector(min_face_size=mfs, device=args.device)
    torch.manual_seed(0)
    encoder = FanEncoder().eval().to(args.device)
    load0 = os.getloadavg()[0]
    rows = []

    def stage(name, fn):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        rows.append((name, time.perf_counter() - w, time.process_time() - c))
        return out

    motions = []
    for side, frames in (("driving", driving), ("generated", generated)):
        track = stage(f"{side}: detect + track (MTCNN, min face {mfs}px)",
                      lambda: track_faces(detect_video(det, frames), max_people=1)[0])
        feats = stage(f"{side}: align 224² + PD-FGC encode", lambda: encode_expressions(
            encoder, np.stack([align_face(f, lm, CROP_SIZE) for f, lm in zip(frames, track.landmarks)])))
        crops, points = stage(f"{side}: align 448²", lambda: aligned_measure_crops(frames, track.landmarks))
        eye, mouth = stage(f"{side}: eye/mouth curves from the crop", lambda: crop_curves(crops, points))
        motions.append(FaceMotion(track, feats, {"eye_openness": eye, "mouth_opening": mouth,
                                                 "mouth_width": mouth_width(points)}))
    ev = stage("compare (metrics)", lambda: compare(motions[:1], motions[1:]))
    stage("plot (matplotlib Agg)", lambda: plot(ev))
    total_w, total_c = sum(r[1] for r in rows), sum(r[2] for r in rows)
    stage("evaluate() end to end", lambda: evaluate(det, [driving], generated, encoder=encoder, encoder_random=True,
                                                    landmarks="crop"))
    load1 = os.getloadavg()[0]

    print(f"\n{len(driving)} frames {driving.shape[2]}x{driving.shape[1]} of {os.path.basename(args.video)} vs the "
          f"same {args.shift} frames later; device {args.device}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, load average {load0:.1f} -> {load1:.1f}\n")
    print("| stage | wall s | CPU s |\n|---|---|---|")
    for name, w, c in rows:
        print(f"| {name} | {w:.2f} | {c:.2f} |")
    print(f"| **sum of the stages** | **{total_w:.2f}** | **{total_c:.2f}** |")
    print(f"\noverall {ev.report['overall']:.3f} (random PD-FGC weights); target: {len(driving)} frames in < 10 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Expression encoding of a driving clip, stage by stage: face detection (MTCNN, batched on the
device), tracking, 5-point alignment (OpenCV, bicubic, bit-exact with the reference), PD-FGC
encoder (batched on the device). Target: 81 frames in under 2 s on a GPU.

    python benchmarks/bench_encode.py --frames 81 --device cuda
    python benchmarks/bench_encode.py --frames 9 --device cpu --batch 8     # CPU figure / smoke run

Uses ``../shared/data/biden.mp4`` (218 frames, 432², one face); the PD-FGC encoder has random
weights (the cost does not depend on them). Prints one markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fantasyportrait_core.faces.mtcnn import MtcnnDetector  # noqa: E402
from fantasyportrait_core.model.expression import FanEncoder, align_face, encode_expressions  # noqa: E402
from fantasyportrait_core.faces.face import detect_video, track_faces  # noqa: E402
from fantasyportrait_core.media.video import read_video  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", default=os.path.join(ROOT, "..", "shared", "data", "biden.mp4"))
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32, help="PD-FGC crops per forward")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                    help="PD-FGC compute dtype (the reference runs fp32)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    frames = read_video(args.video, max_frames=args.frames).frames
    detector = MtcnnDetector(device=device)
    encoder = FanEncoder().eval().to(device, dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # warm-up (cuDNN autotune, MTCNN first call) on a few frames
    detect_video(detector, frames[:4])
    encode_expressions(encoder, np.zeros((2, 224, 224, 3), np.uint8))
    sync()
    rows = []
    t = time.perf_counter()
    per_frame = detect_video(detector, frames)
    sync()
    rows.append(("face detection (MTCNN, batches of 16)", time.perf_counter() - t))
    t = time.perf_counter()
    tracks = track_faces(per_frame, max_people=1)
    rows.append(("tracking + gap filling", time.perf_counter() - t))
    t = time.perf_counter()
    crops = np.stack([align_face(f, lm) for f, lm in zip(frames, tracks[0].landmarks)])
    rows.append(("alignment (cv2.warpAffine bicubic, CPU)", time.perf_counter() - t))
    t = time.perf_counter()
    feats = encode_expressions(encoder, crops, batch_size=args.batch)
    sync()
    rows.append((f"PD-FGC encoder (batches of {args.batch}, {args.dtype})", time.perf_counter() - t))
    assert feats.shape == (len(frames), 554) and torch.isfinite(feats).all()
    total = sum(dt for _, dt in rows)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{name}; {len(frames)} frames {frames.shape[2]}×{frames.shape[1]} from {os.path.basename(args.video)}\n")
    print("| stage | s | ms / frame |\n|---|---|---|")
    for label, dt in rows + [("total", total)]:
        print(f"| {label} | {dt:.2f} | {1000 * dt / len(frames):.1f} |")
    detector.close()


if __name__ == "__main__":
    main()

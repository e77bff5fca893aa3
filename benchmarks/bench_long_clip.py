"""Peak memory of the CLI on long driving clips (issue #13): the driving video is streamed, so peak
RSS must not grow with the clip's length.

    python benchmarks/bench_long_clip.py                      # this checkout, 10/20/60 s clips
    python benchmarks/bench_long_clip.py --repo /tmp/fp_main --seconds 10 20   # another checkout

Composes the clips deterministically with PyAV by looping ``two_person.mp4`` (1280×720, 23 fps;
frame i of the clip is frame i mod 146 of the source) into ``--clip-dir`` (not the repo), then runs
``python -m fantasyportrait_core.cli run --tiny-random`` from ``--repo`` generating ``--frames``
frames in a fresh process per clip and reads that process's peak RSS (``getrusage`` of the
child, exact). Prints a markdown table; no asserts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("FANTASYPORTRAIT_DATA", os.path.join(ROOT, "..", "shared", "data"))

MEASURE = r"""
import resource, subprocess, sys, time
t = time.time()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(rc.returncode, peak_kib, round(time.time() - t, 1))
if rc.returncode:
    print(rc.stderr[-2000:], file=sys.stderr)
"""


def make_clip(path: str, seconds: float, source: str) -> int:
    """Loop ``source`` into a ``seconds`` long H.264 clip at the source's size and rate."""
    import av
    import numpy as np

    with av.open(source) as c:
        s = c.streams.video[0]
        fps = s.average_rate
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
    n = int(round(seconds * float(fps)))
    tmp = path + ".partial.mp4"
    with av.open(tmp, "w") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height = frames[0].shape[1], frames[0].shape[0]
        vs.pix_fmt = "yuv420p"
        vs.options = {"crf": "23", "preset": "veryfast"}
        for i in range(n):
            for p in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i % len(frames)]), format="rgb24")):
                out.mux(p)
        for p in vs.encode():
            out.mux(p)
    os.replace(tmp, path)
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=ROOT, help="checkout whose CLI is measured")
    ap.add_argument("--seconds", type=float, nargs="+", default=[10, 20, 60])
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--max-size", type=int, default=256)
    ap.add_argument("--clip-dir", default=os.path.join(tempfile.gettempdir(), "fp_long_clips"))
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args(argv)
    os.makedirs(args.clip_dir, exist_ok=True)
    source = os.path.join(DATA, "two_person.mp4")
    rows = []
    for sec in args.seconds:
        clip = os.path.join(args.clip_dir, f"two_person_loop_{sec:g}s.mp4")
        if not os.path.isfile(clip):
            make_clip(clip, sec, source)
        out = os.path.join(args.clip_dir, f"out_{sec:g}s.mp4")
        cmd = [args.python, "-m", "fantasyportrait_core.cli", "run", "--tiny-random", "--image",
               os.path.join(DATA, "two_person.png"), "--driving", clip, "--people", "2", "--frames", str(args.frames),
               "--max-size", str(args.max_size), "--steps", "1", "--device", "cpu", "--out", out]
        res = subprocess.run([args.python, "-c", MEASURE, *cmd], cwd=args.repo, capture_output=True, text=True,
                             env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        line = res.stdout.strip().splitlines()[-1].split() if res.stdout.strip() else ["?", "0", "0"]
        rc, peak_kib, wall = line
        if rc != "0":
            print(res.stderr[-1500:], file=sys.stderr)
        rows.append((sec, clip, int(peak_kib) / 2**20, float(wall), rc))
    print(f"\nCLI peak memory, driving clip = two_person.mp4 looped (1280x720, 23 fps), --frames {args.frames}, "
          f"--max-size {args.max_size}, tiny random model, CPU; repo {args.repo}\n")
    print("| clip | frames in clip | peak RSS (GiB) | wall (s) | exit |")
    print("|---|---|---|---|---|")
    for sec, clip, gib, wall, rc in rows:
        print(f"| {sec:g} s | {int(round(sec * 23))} | {gib:.2f} | {wall:.0f} | {rc} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

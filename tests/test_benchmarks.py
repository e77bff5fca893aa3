"""The benchmark scripts run (tiny settings); their figures are printed, never asserted."""

import os
import subprocess
import sys

from .conftest import ROOT


def test_forward_benchmark_runs_tiny():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_forward.py"), "--tiny", "--device",
                          "cpu", "--frames", "5", "--size", "32x32", "--people", "1,3", "--storage", "fp8",
                          "--repeat", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for row in ("bare diffusers forward", "ours, portrait, 3 character(s)", "one dual-guidance step"):
        assert row in out.stdout

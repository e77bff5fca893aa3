"""The LoRA and sampling benchmark scripts run (tiny settings); their figures are printed, never asserted."""

import os
import subprocess
import sys

from .conftest import ROOT


def _run(*argv):
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_lora_benchmark_runs_tiny():
    text = _run(os.path.join("benchmarks", "bench_lora.py"), "--tiny", "--repeat", "1", "--ranks", "8",
                "--ratios", "0.1", "--device", "cpu")
    assert "| delta |" in text and "| merge |" in text


def test_sampling_benchmark_runs_tiny():
    text = _run(os.path.join("benchmarks", "bench_sampling.py"), "--full-size", "--tiny", "--layers", "2",
                "--device", "cpu", "--frames", "5", "--size", "32x32", "--steps", "2", "--storage", "fp8")
    assert "| unipc 2 steps |" in text and "| lightx2v LoRA, 4 steps |" in text and "ratio" in text


def test_sampling_benchmark_runs_the_cli_pipeline():
    """The default mode drives the core's run_job, as the CLI does (a changed signature there
    must show here, not in the next benchmark run)."""
    from .conftest import DATA

    text = _run(os.path.join("benchmarks", "bench_sampling.py"), "--frames", "5", "--max-size", "64",
                "--data", DATA)
    assert "| unipc 30 steps | 60 |" in text and "| lightx2v LoRA, 4 steps | 8 |" in text and "ratio" in text

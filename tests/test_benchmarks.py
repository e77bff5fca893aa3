"""The benchmark scripts run (tiny settings); their figures are printed, never asserted."""

import os
import subprocess
import sys

from .conftest import ROOT


def test_forward_benchmark_runs_tiny():
    """Every phase of the GPU table runs (bf16, fast mode with fp8 matmul, block offload), without
    compile to stay quick; the compiled path is covered by tests/test_perf.py."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_forward.py"), "--tiny", "--device",
                          "cpu", "--frames", "5", "--sizes", "32x32", "--people", "1,3", "--no-compile"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for row in ("bare diffusers forward", "ours, portrait, 3 character(s)", "one guidance step, 3 passes batched",
                "fast (fp8 matmul)", "low-VRAM plan: fp8 + block offload"):
        assert row in out.stdout, row
    assert "phase C done" in out.stdout


def test_load_benchmark_runs_tiny(tmp_path):
    """Sharded bf16 (original keys + index) and sharded fp8-scaled (Comfy prefix) checkpoints are
    written and loaded by every loader; a forward runs on each loaded model."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_load.py"), "--tiny", "--layers", "2",
                          "--shard-mib", "0.01", "--forward", "--keep", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| bf16") or line.startswith("| fp8_scaled")]
    assert len(rows) == 5, out.stdout
    for row in rows:
        assert "failed" not in row and "non-finite" not in row, row
    for fmt in ("bf16", "fp8_scaled"):
        files = os.listdir(tmp_path / f"wan_i2v_2layers_{fmt}")
        assert "diffusion_pytorch_model.safetensors.index.json" in files
        assert sum(f.endswith(".safetensors") for f in files) > 1, files

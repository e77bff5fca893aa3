"""Runs scripts/check_in_comfyui.py against a real ComfyUI when COMFYUI_DIR is set (skipped otherwise)."""

import os
import subprocess
import sys

import pytest

from .conftest import ROOT

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")


@pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run the real-ComfyUI check")
def test_pack_runs_in_real_comfyui():
    py = os.environ.get("COMFYUI_PYTHON") or os.path.join(COMFYUI_DIR, "venv", "bin", "python")
    res = subprocess.run([py if os.path.exists(py) else sys.executable, os.path.join(ROOT, "scripts", "check_in_comfyui.py"),
                          COMFYUI_DIR], capture_output=True, text=True, timeout=1800)
    print(res.stdout[-4000:])
    assert res.returncode == 0 and "RESULT: PASS" in res.stdout

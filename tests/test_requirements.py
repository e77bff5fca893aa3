"""requirements.txt never downgrades or replaces what a ComfyUI venv already has.

Static checks (no network) on requirements.txt and pyproject.toml, and real pip resolutions
(``pip install --dry-run``, binary wheels only) into stand-in ComfyUI environments: venvs holding
metadata-only copies of what ComfyUI installs (torch, torchvision, numpy 2, transformers,
huggingface_hub), so pip sees them as installed exactly as in a real ComfyUI venv without
downloading torch. The resolutions need the package index; offline they are skipped (CI reaches PyPI).
docs/INSTALL.md has the full installs into two real ComfyUI venvs.
"""

import json
import os
import re
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from .conftest import ROOT

# What ComfyUI (or the user's other node packs) already own: we may require them, never cap them.
NO_UPPER_PIN = {"numpy", "torch", "torchvision", "torchaudio", "transformers", "huggingface-hub", "protobuf",
                "opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless",
                "onnxruntime", "onnxruntime-gpu", "pillow", "safetensors", "av", "tokenizers"}
# Optional backends and the other OpenCV builds: never installed by default (docs/INSTALL.md).
NOT_REQUIRED = {"mediapipe", "insightface", "onnxruntime", "onnxruntime-gpu", "opencv-python-headless",
                "opencv-contrib-python", "opencv-contrib-python-headless", "jax", "jaxlib"}
CAPPING = {"<", "<=", "==", "===", "~="}


def requirement_lines(path):
    with open(path) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def problems(lines):
    """Every rule a requirements list breaks (empty when it is fine)."""
    out = []
    names = []
    for line in lines:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        names.append(name)
        caps = [str(s) for s in req.specifier if s.operator in CAPPING]
        if (name in NO_UPPER_PIN or name.startswith(("opencv", "onnxruntime"))) and caps:
            out.append(f"{req.name}: {','.join(caps)} caps a package ComfyUI already has")
        if name in NOT_REQUIRED:
            out.append(f"{req.name} must stay optional")
        if name == "facenet-pytorch" and str(req.specifier) != "==2.5.3":
            out.append("facenet-pytorch must be ==2.5.3 (2.6.0 pins torch<2.3)")
    if "diffusers" in names:
        late = [n for n in ("huggingface-hub", "transformers") if n not in names[: names.index("diffusers")]]
        if late:
            out.append(f"{', '.join(late)} must come before diffusers (pip keeps installed versions in file order)")
    return out


def test_the_rules_catch_the_old_requirements():
    old = ["diffusers>=0.35", "opencv-python-headless<5", "onnxruntime", "mediapipe==0.10.21", "numpy<2",
           "protobuf>=4.25.3,<5", "insightface", "facenet-pytorch", "transformers"]
    found = "\n".join(problems(old))
    for expected in ("opencv-python-headless: <5", "onnxruntime must stay optional", "mediapipe must stay",
                     "numpy: <2", "protobuf: <5", "insightface must stay", "facenet-pytorch must be ==2.5.3",
                     "huggingface-hub, transformers must come before diffusers"):
        assert expected in found, (expected, found)


def test_requirements_never_cap_what_comfyui_has():
    lines = requirement_lines(os.path.join(ROOT, "requirements.txt"))
    assert problems(lines) == []
    assert {"diffusers", "facenet-pytorch", "opencv-python", "peft", "gguf"} <= {
        canonicalize_name(Requirement(line).name) for line in lines}


def test_pyproject_dependencies_are_requirements_txt():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["dependencies"] == requirement_lines(os.path.join(ROOT, "requirements.txt"))
    assert project["requires-python"] == ">=3.10"


def test_dev_requirements_include_the_runtime_ones():
    assert "-r requirements.txt" in requirement_lines(os.path.join(ROOT, "requirements-dev.txt"))


# --------------------------------------------------------------------------- real resolutions

# Stand-in ComfyUI venvs: what is installed before `pip install -r requirements.txt`, with the
# requirement that makes each case hard (transformers 4.x allows only huggingface_hub < 1; diffusers
# 0.36-0.41 only hub < 2, 0.42+ only Python >= 3.11).
COMFYUI_ENVS = {
    "py3.13, transformers 5, hub 2.x, numpy 2 (a current ComfyUI / portable build)": ("3.13", {
        "torch": ("2.14.1", []), "torchvision": ("0.29.1", ["torch==2.14.1"]), "numpy": ("2.5.5", []),
        "transformers": ("5.24.0", ["huggingface-hub<3.0,>=1.31.0", "numpy>=1.17"]),
        "huggingface_hub": ("2.4.0", [])}),
    "py3.11, transformers 4.57, hub 0.36, numpy 2": ("3.11", {
        "torch": ("2.14.1", []), "torchvision": ("0.29.1", ["torch==2.14.1"]), "numpy": ("2.4.6", []),
        "transformers": ("4.57.6", ["huggingface-hub<1.0,>=0.34.0", "numpy>=1.17"]),
        "huggingface_hub": ("0.36.2", [])}),
    "py3.10, only torch + torchvision": ("3.10", {
        "torch": ("2.14.1", []), "torchvision": ("0.29.1", ["torch==2.14.1"])}),
}


def _index_url():
    url = os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
    try:
        urllib.request.urlopen(url.rstrip("/") + "/pip/", timeout=10).close()
    except Exception as e:  # noqa: BLE001 - any failure means: no index here
        return None, f"package index {url} not reachable ({type(e).__name__}); CI runs this resolution"
    return url, ""


def _stub_venv(path, installed):
    """A venv without pip holding metadata-only distributions (what pip reads to decide)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    site = next(os.path.join(root, d) for root, dirs, _ in os.walk(path) for d in dirs if d == "site-packages")
    for name, (version, requires) in installed.items():
        info = os.path.join(site, f"{name}-{version}.dist-info")
        os.makedirs(info)
        with open(os.path.join(info, "METADATA"), "w") as f:
            f.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                    + "".join(f"Requires-Dist: {r}\n" for r in requires))
        for extra in ("INSTALLER", "RECORD"):
            open(os.path.join(info, extra), "w").close()
    return os.path.join(path, "Scripts" if os.name == "nt" else "bin", "python")


def _resolve(tmp_path, case):
    python_version, installed = COMFYUI_ENVS[case]
    folder = tmp_path / re.sub(r"\W+", "_", case)[:40]
    python = _stub_venv(folder, installed)
    report = folder / "report.json"
    cmd = [sys.executable, "-m", "pip", "--python", python, "install", "--dry-run", "--quiet", "--report", str(report),
           "--python-version", python_version, "--only-binary=:all:", "--disable-pip-version-check",
           "-r", os.path.join(ROOT, "requirements.txt"), "numpy>=2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return case, None, out.stderr[-3000:]
    with open(report) as f:
        return case, {canonicalize_name(i["metadata"]["name"]): Version(i["metadata"]["version"])
                      for i in json.load(f)["install"]}, ""


def test_requirements_resolve_into_comfyui_venvs_without_touching_them(tmp_path):
    """Python 3.13 / 3.11 / 3.10, binary wheels only, numpy 2: pip must find a solution that adds
    packages but changes none that is installed (no upgrade, no downgrade, no second OpenCV), and
    must pick the diffusers matching the installed huggingface_hub."""
    _, why = _index_url()
    if why:
        pytest.skip(why)
    with ThreadPoolExecutor(len(COMFYUI_ENVS)) as pool:
        results = list(pool.map(lambda c: _resolve(tmp_path, c), COMFYUI_ENVS))
    for case, added, err in results:
        assert added is not None, f"{case}: pip found no solution:\n{err}"
        touched = sorted(set(added) & {canonicalize_name(n) for n in COMFYUI_ENVS[case][1]})
        assert not touched, f"{case}: installing requirements.txt would replace {touched}"
        assert not set(added) & NOT_REQUIRED, f"{case}: pulls in {sorted(set(added) & NOT_REQUIRED)}"
        if "numpy" in added:
            assert added["numpy"] >= Version("2"), f"{case}: numpy {added['numpy']}"
        assert "diffusers" in added and "facenet-pytorch" in added, case
    diffusers = {case: added["diffusers"] for case, added, _ in results}
    assert diffusers["py3.11, transformers 4.57, hub 0.36, numpy 2"] < Version("0.40")  # hub < 1
    assert diffusers["py3.13, transformers 5, hub 2.x, numpy 2 (a current ComfyUI / portable build)"] >= Version("0.42")

"""The published layout holds: the core imports without ComfyUI or the nodes, its modules stay one
concept each (none much over 450 lines), and benchmarks/ and scripts/ use only the core's public API."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = ROOT / "fantasyportrait_core"
MAX_LINES = 500  # "none much over 450" (issue 23)


def _modules():
    return sorted(p for p in CORE.rglob("*.py"))


def test_every_core_module_imports_without_comfyui_or_the_nodes():
    names = [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in _modules()]
    code = ("import importlib, sys\n"
            f"for n in {names!r}: importlib.import_module(n)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'nodes', 'folder_paths'))\n"
            "print(len(bad)); print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[0] == "0", out.stdout


def test_core_modules_stay_small():
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concept: {long}"


def test_benchmarks_and_scripts_import_nothing_from_tests_or_private_cli_names():
    offenders = []
    for path in [*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                mods, names = [a.name for a in node.names], []
            else:
                continue
            if any(m == "tests" or m.startswith("tests.") for m in mods):
                offenders.append(f"{path.name}: {mods[0]}")
            if node.__class__ is ast.ImportFrom and node.module == "fantasyportrait_core.cli" and \
                    any(n.startswith("_") for n in names):
                offenders.append(f"{path.name}: private CLI name")
    assert not offenders, offenders

"""Rename this pack's old node ids in saved ComfyUI graphs (UI workflow or API prompt JSON).

    python scripts/migrate_workflows.py my_graph.json [more.json ...]      # in place, keeps my_graph.json.bak
    python scripts/migrate_workflows.py my_graph.json --out migrated.json  # one file, written elsewhere

Needed for graphs saved before the pack stopped registering ``FantasyPortraitModelLoader`` (the id
ComfyUI-WanVideoWrapper registers too) when the ComfyUI at hand has no core node replacement or when
WanVideoWrapper is installed beside this pack (see docs/COMPATIBILITY.md). Other packs' nodes with
the same id are left as they are. Only the standard library is needed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ids():
    spec = importlib.util.spec_from_file_location("fantasyportrait_ids", os.path.join(ROOT, "nodes", "ids.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="workflow .json files (UI or API format)")
    p.add_argument("--out", help="write the migrated graph here instead of in place (one input file only)")
    a = p.parse_args(argv)
    if a.out and len(a.files) != 1:
        p.error("--out takes exactly one input file")
    ids = _ids()
    for path in a.files:
        try:
            with open(path, encoding="utf-8") as f:
                graph = json.load(f)
        except (OSError, ValueError) as e:
            print(f"error: {path}: not a readable JSON graph ({e})", file=sys.stderr)
            return 2
        done = ids.migrate_graph(graph)
        target = a.out or path
        if done or a.out:
            if not a.out:
                shutil.copyfile(path, path + ".bak")
            with open(target, "w", encoding="utf-8") as f:
                json.dump(graph, f, indent=1 if "nodes" in graph else None)
                f.write("\n")
        print(f"{path}: {len(done)} node(s) renamed" + "".join(f"\n  {d}" for d in done)
              + (f"\n  written to {target}" if done or a.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

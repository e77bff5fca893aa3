"""Soak test (not in CI): many prompts, good and bad, queued through a real ComfyUI's /prompt.

    /path/to/ComfyUI/venv/bin/python scripts/soak_comfyui.py /path/to/ComfyUI [--port 8240] [--prompts 50]

Starts ComfyUI with this pack and tiny random checkpoints exactly as ``check_in_comfyui.py`` does
(its ``comfyui_session``), then queues ``--prompts`` prompts built from the example workflows,
shrunk to 64×64 and 5 frames, one at a time. About half are good (each with a new seed, so the
sampler, VAE and SaveVideo really run again); the others carry one bad input each, caught either
when queued (``VALIDATE_INPUTS``, ComfyUI's own checks) or when the node runs. It checks that

* every good prompt yields its video (decoded: frame count and size),
* every bad prompt yields its own error (the expected words, at the expected stage),
* the server keeps serving (``/object_info`` answers after the last prompt),
* the server's resident memory does not grow from the 10th to the last prompt (RSS sampled after
  each prompt; growth under 5 % passes),

prints one line per prompt and a summary with the memory figures; exit status 0 when all hold.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_in_comfyui as C  # noqa: E402  (the session, prompt and model code is shared)

LENGTH = 5
GROWTH_LIMIT = 0.05


def _ids(prompt: dict, class_type: str) -> list[str]:
    return [k for k, n in prompt.items() if n["class_type"] == class_type]


def _set(prompt: dict, class_type: str, **inputs) -> dict:
    p = copy.deepcopy(prompt)
    for k in _ids(p, class_type):
        p[k]["inputs"].update(inputs)
    return p


def base_prompts(session) -> dict:
    """The two example workflows as tiny API prompts (5 frames, 1 step, encode only 5 frames)."""
    out = {}
    for key, name, size, transformer in (("single", "fantasyportrait_single.json", (64, 64), "transformer"),
                                         ("multi", "fantasyportrait_multi.json", (96, 64), "transformer")):
        with open(os.path.join(C.ROOT, "workflows", name)) as f:
            wf = json.load(f)
        p = C.adapt_for_check(C.ui_to_api(wf, session.info), session.names, LENGTH, size, session.names[transformer])
        p = _set(p, "FantasyPortraitSampler", steps=1)
        out[key] = (_set(p, "FantasyPortraitEncodeExpression", max_frames=LENGTH), size)
    return out


def make_inputs(in_dir: str):
    """A faceless and a too-small reference image in ComfyUI's input folder."""
    from PIL import Image

    Image.new("RGB", (256, 256), (128, 128, 128)).save(os.path.join(in_dir, "soak_blank.png"))
    Image.new("RGB", (16, 16), (200, 150, 120)).save(os.path.join(in_dir, "soak_tiny.png"))


def cases(base: dict):
    """(name, prompt builder(seed), expected: ("video", size) | ("rejected" | "error", words))."""
    single, s_size = base["single"]
    multi, m_size = base["multi"]
    load_image = lambda p, name: _set(p, "LoadImage", image=name)  # noqa: E731
    return [
        ("good single", lambda seed: _set(single, "FantasyPortraitSampler", seed=seed), ("video", s_size)),
        ("bad face_order syntax", lambda seed: _set(single, "FantasyPortraitConditioning", face_order="first"),
         ("rejected", "must be comma-separated face numbers")),
        ("good single", lambda seed: _set(single, "FantasyPortraitSampler", seed=seed), ("video", s_size)),
        ("face_order beyond the faces", lambda seed: _set(single, "FantasyPortraitConditioning", face_order="3"),
         ("error", "face_order uses face 3 but the reference image has 1 face")),
        ("good multi", lambda seed: _set(multi, "FantasyPortraitSampler", seed=seed), ("video", m_size)),
        ("faceless reference", lambda seed: load_image(single, "soak_blank.png"), ("error", "no face found")),
        ("good single", lambda seed: _set(single, "FantasyPortraitSampler", seed=seed), ("video", s_size)),
        ("start_frame past the end",
         lambda seed: _set(single, "FantasyPortraitEncodeExpression", start_frame=100000),
         ("error", "is past the end of the")),
        ("context_overlap >= context_frames",
         lambda seed: _set(single, "FantasyPortraitSampler", context_frames=9, context_overlap=12),
         ("rejected", "context_overlap (12) must be less than context_frames (9)")),
        ("good single", lambda seed: _set(single, "FantasyPortraitSampler", seed=seed), ("video", s_size)),
        ("16x16 reference", lambda seed: load_image(single, "soak_tiny.png"), ("error", "is 16x16")),
        ("people beyond the video", lambda seed: _set(single, "FantasyPortraitEncodeExpression", people=3),
         ("error", "shows 1 face(s) but 3 character(s)")),
        ("good single", lambda seed: _set(single, "FantasyPortraitSampler", seed=seed), ("video", s_size)),
        ("latent longer than the driver", lambda seed: _set(single, "WanImageToVideo", length=9),
         ("error", "the latent is 9 frames long but a driving expression has only 5")),
        ("missing model file",
         lambda seed: _set(single, "FantasyPortraitWanModelLoader", adapter="not_there.safetensors"),
         ("rejected", "not_there.safetensors")),
        ("good single", lambda seed: _set(single, "FantasyPortraitSampler", seed=seed), ("video", s_size)),
    ]


def judge(result: dict, expected, out_dir: str) -> tuple[bool, str]:
    kind, what = expected
    if kind == "video":
        if "rejected" in result or result["status"] != "success":
            return False, f"expected a video, got {json.dumps(result.get('rejected') or result.get('error'))[:300]}"
        videos = C.output_videos(result)
        if not videos:
            return False, "no video output"
        v = videos[0]
        p = C.probe(os.path.join(out_dir, v.get("subfolder", ""), v["filename"]))
        ok = p["frames"] == LENGTH and (p["width"], p["height"]) == what
        return ok, f"{v['filename']} {p['frames']} frames {p['width']}x{p['height']}"
    if kind == "rejected":
        text = json.dumps(result.get("rejected", ""))
        return ("rejected" in result and what in text.replace('\\"', '"')), f"rejected: {text[:200]}"
    text = str(result.get("error") or "")
    return (result.get("status") == "error" and what in text), f"error: {text[:200]}"


def rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("comfyui_dir")
    ap.add_argument("--port", type=int, default=8240)
    ap.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON"))
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    comfy = os.path.abspath(args.comfyui_dir)
    py = C.resolve_python(comfy, args.python)
    rows, rss, ok = [], [], True
    t0 = time.time()
    with C.comfyui_session(comfy, py, args.port, args.keep) as session:
        make_inputs(session.in_dir)
        table = cases(base_prompts(session))
        print(f"ComfyUI up after {session.started_s:.0f} s; server pid {session.server.pid}, RSS "
              f"{rss_mib(session.server.pid):.0f} MiB", flush=True)
        for i in range(args.prompts):
            name, build, expected = table[i % len(table)]
            result = C.run_prompt(session.base, build(1000 + i), timeout=900, client_id="fp-soak")
            good, detail = judge(result, expected, session.out_dir)
            ok &= good
            rss.append(rss_mib(session.server.pid))
            rows.append((i + 1, name, expected[0], good, detail, result.get("seconds", 0.0), rss[-1]))
            print(f"{i + 1:3d} {'PASS' if good else 'FAIL'} {name:34s} {detail[:110]} | RSS {rss[-1]:.0f} MiB",
                  flush=True)
        serving = "FantasyPortraitSampler" in C.get(session.base + "/object_info", timeout=60)
        alive = session.server.poll() is None
    n = len(rss)
    first = rss[min(9, n - 1)]
    last = rss[-1]
    growth = (last - first) / first
    peak = max(rss[min(9, n - 1):])
    mem_ok = growth < GROWTH_LIMIT
    goods = sum(1 for r in rows if r[2] == "video")
    print(f"\nprompts: {n} ({goods} good, {n - goods} bad), all as expected: {ok}; server alive and serving after "
          f"the last: {alive and serving}; wall {time.time() - t0:.0f} s")
    print(f"server RSS: after prompt 10 {first:.0f} MiB, after prompt {n} {last:.0f} MiB (growth {100 * growth:+.1f} %, "
          f"limit {100 * GROWTH_LIMIT:.0f} %), peak from prompt 10 on {peak:.0f} MiB")
    print("RESULT:", "PASS" if ok and alive and mem_ok else "FAIL")
    return 0 if ok and alive and mem_ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""An evaluation for people: a text table (:func:`format_table`), plain JSON (:func:`json_ready`)
and per-frame curves as an image (:func:`plot`)."""

from __future__ import annotations

import numpy as np

from fantasyportrait_core.evaluation.compare import Evaluation
from fantasyportrait_core.evaluation.measure import CURVES


def _fmt(v, digits=3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def format_table(report: dict) -> str:
    """The report as a fixed-width text table (one block per character)."""
    lines = [f"FantasyPortrait evaluation: overall {report['overall']:.3f}  ({report['frames_compared']} frames; "
             f"landmarks: {report['landmarks']}; expression encoder: {report['expression_encoder']})"]
    for ch in report["characters"]:
        lines.append(f"character {ch['character']}: overall {ch['overall']:.3f}")
        lines.append(f"  {'metric':<15}{'distance/MAE':>13}{'relative':>10}{'pearson':>9}{'score':>8}")
        for key in ("expression", "head_pose", *CURVES):
            m = ch[key]
            if isinstance(m, str):
                lines.append(f"  {key:<15}{m}")
                continue
            dist = m.get("distance", m.get("mae"))
            lines.append(f"  {key:<15}{_fmt(dist, 4):>13}{_fmt(m['relative']):>10}{_fmt(m.get('pearson')):>9}"
                         f"{_fmt(m['score']):>8}")
        ident = ch["identity"]
        lines.append(f"  {'identity':<15}" + (ident if isinstance(ident, str) else
                                            f"cosine mean {ident['cosine_mean']:.3f}, min {ident['cosine_min']:.3f}"))
    return "\n".join(lines)


def json_ready(report: dict) -> dict:
    """``report`` with numpy scalars/arrays turned into plain Python (for ``json.dump``)."""
    def conv(v):
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, np.ndarray):
            return v.tolist()
        if isinstance(v, np.generic):
            return v.item()
        return v

    return conv(report)


_TITLES = {"expression": "expression distance (relative)", "head_pose": "head-pose distance (relative)",
           "eye_openness": "eye openness (IOD)", "mouth_opening": "mouth opening (IOD)",
           "mouth_width": "mouth width (IOD)"}


def plot(evaluation: Evaluation, title: str = "") -> np.ndarray:
    """Per-frame curves, one row per character and one panel per metric: driving vs generated for
    the landmark curves, the per-frame relative distance for the PD-FGC metrics; the title carries
    the overall score, each panel its own score.

    Returns:
        uint8 ``[H, W, 3]`` RGB image (matplotlib, Agg backend; no display needed).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the evaluation plot needs matplotlib: pip install matplotlib") from e

    report, series = evaluation.report, evaluation.series
    keys = [k for k in ("expression", "head_pose", *CURVES) if any(k in s for s in series)]
    rows, cols = len(series), len(keys)
    random_encoder = "RANDOM" in str(report.get("expression_encoder", ""))
    fig = Figure(figsize=(3.4 * cols, 2.5 * rows + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, (plot_data, ch) in enumerate(zip(series, report["characters"])):
        for c, key in enumerate(keys):
            ax = axes[r, c]
            d, g = plot_data[key]
            m = ch[key]
            if d is None:
                ax.plot(g, color="tab:red", lw=1.2, label="generated vs driving")
                ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
                sub = f"score {m['score']:.2f}" + ("  [RANDOM encoder]" if random_encoder else "")
            else:
                ax.plot(d, color="tab:blue", lw=1.2, label="driving")
                ax.plot(g, color="tab:orange", lw=1.2, label="generated")
                sub = f"r {_fmt(m['pearson'], 2)}  MAE {m['mae']:.3f}  score {m['score']:.2f}"
            ax.set_title(f"#{ch['character']} {_TITLES[key]}\n{sub}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_xlabel("frame", fontsize=7)
            if r == 0 and c in (0, cols - 1):
                ax.legend(fontsize=6, loc="upper right")
    head = f"overall {report['overall']:.3f}" + "".join(
        f"   #{ch['character']}: {ch['overall']:.3f}" for ch in report["characters"])
    fig.suptitle(f"{title}  {head}".strip(), fontsize=11)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()

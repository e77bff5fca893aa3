"""Many clips on one model load: ``cli batch JOBS --out DIR [run options]``.

A jobs file holds one job a line, as ``.jsonl`` (one JSON object a line) or ``.csv`` (a header row,
then one row a job). Its keys are the ``run`` option names without dashes (``image``, ``driving``,
``people``, ``steps``, ``portrait_cfg`` or ``portrait-cfg``...); the options given on the command line
are every job's defaults. ``out`` is relative to DIR; without it the output is named after the
image and the drivers (``man__jgz.mp4``). In a CSV, list values (``driving``, ``people``, ``lora``...)
are separated by ``;``.

Every line becomes a :class:`~fantasyportrait_core.runtime.job.Job` through the same argument parser
and builder the ``run`` command uses, and is checked by the same
:func:`~fantasyportrait_core.runtime.plan.plan_run`, all before the first job: a malformed line is
refused with its line number. The model is loaded once and every job runs through
:func:`~fantasyportrait_core.runtime.runner.run_job` on it. A job whose output exists is skipped
(outputs are written atomically, so an existing file is a finished one: a rerun resumes); a job that
fails gets one log line and a row in ``DIR/batch_report.json`` and the batch goes on. Ctrl-C (or
SIGTERM, as a cluster's scheduler sends) stops after the current sampling step; a second Ctrl-C
stops at once. Finished outputs stay.

Under ``torchrun`` (``torch.distributed``; see docs/SCALING.md) the pending jobs are dealt out
round-robin over the ranks, each rank runs its jobs on its own GPU (``cuda:LOCAL_RANK``), every rank
writes its rows to ``DIR/.batch_report.rank<R>.json`` after each job, and rank 0 merges them into
one ``batch_report.json`` at the end. No output is written by two ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass

from fantasyportrait_core.validate import InputError

log = logging.getLogger("FantasyPortrait")

REPORT_NAME = "batch_report.json"

BATCH_HELP = """Many clips on one model load. JOBS holds one job a line: .jsonl (a JSON object a line) or .csv
(a header row; list values separated by ';'). Keys are the run options without dashes; the options
given here are every job's defaults. 'out' is relative to --out DIR (default IMAGE__DRIVERS.mp4).

  {"image": "anna.png", "driving": ["take1.mp4"], "steps": 4, "out": "anna_take1.mp4"}
  {"image": "duo.png", "driving": ["a.mp4", "b.mp4"], "portrait_cfg": 3.5, "seed": 7}

Every line is checked before the first job (refused with its line number). A job whose output
exists is skipped, so a rerun resumes; a failing job is logged, reported in DIR/batch_report.json
(status, seconds, error) and the batch goes on. Ctrl-C stops after the current step. Model options
(checkpoints, --lora, --dtype, --fp8, --device...) apply to the whole batch. Under
torchrun --nproc-per-node N the jobs are shared over the N GPUs (see docs/SCALING.md).
"""

# Options of the model every job shares (one load): only on the command line, never per line.
MODEL_KEYS = ("transformer", "wan_dir", "adapter", "pd_fpg", "dtype", "fp8", "fast", "compile", "attention",
              "lora", "tiny_random", "device", "offload", "parallel")


@dataclass
class BatchJob:
    """One line of a jobs file.

    Attributes:
        line: 1-based line number in the jobs file (CSV: the row's first physical line).
        job: the :class:`~fantasyportrait_core.runtime.job.Job` (``out`` absolute, inside the batch folder).
        out: absolute output path.
    """

    line: int
    job: object
    out: str


class Stop:
    """A stop request (first Ctrl-C / SIGTERM): :meth:`check` raises :class:`KeyboardInterrupt` after
    the request, so sampling stops at the end of the step it is in; a second Ctrl-C raises at once."""

    def __init__(self):
        self.requested = False

    def check(self, *_):
        """Raise :class:`KeyboardInterrupt` when a stop was requested (called after every step)."""
        if self.requested:
            raise KeyboardInterrupt("stopped on request")

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("[FantasyPortrait] stopping after the current step (finished outputs are kept; Ctrl-C again to "
                    "stop now)")

    @contextlib.contextmanager
    def installed(self):
        """SIGINT and SIGTERM handlers for the block (main thread only; elsewhere a no-op)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


class RefusingParser(argparse.ArgumentParser):
    """An argument parser that raises :class:`InputError` instead of exiting."""

    def error(self, message):
        raise InputError(message)


def _option_actions(parser: argparse.ArgumentParser) -> dict:
    """``{dest: action}`` of every option of ``parser`` (dest spelled with underscores)."""
    return {a.dest: a for a in parser._actions if a.option_strings}


def _truth(value, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise InputError(f"'{key}' is a switch: give true or false, got {value!r}")


def line_tokens(entry: dict, actions: dict, csv_lists: bool = False) -> list[str]:
    """The ``run`` arguments of one jobs-file entry, e.g. ``{"driving": ["a.mp4", "b.mp4"], "steps": 4}``
    -> ``["--driving", "a.mp4", "b.mp4", "--steps=4"]``.

    Args:
        entry: key -> value; keys are option names without the dashes (``-`` or ``_`` inside);
            values are strings, numbers, booleans (switches), lists (options taking several values,
            or repeatable ones such as ``strength``) or ``None`` (the default).
        actions: :func:`_option_actions` of the line parser.
        csv_lists: split string values of list options on ``;`` (CSV cells).
    Raises:
        InputError: an unknown key, a model option (:data:`MODEL_KEYS`) or a bad switch value.
    """
    tokens = []
    for key, value in entry.items():
        dest = str(key).strip().lstrip("-").replace("-", "_")
        if dest in MODEL_KEYS:
            raise InputError(f"'{key}' sets the model, which every job of a batch shares (one load): give it on the "
                             f"batch command line instead")
        if dest not in actions:
            known = ", ".join(sorted(d for d in actions if d not in MODEL_KEYS and d != "help"))
            raise InputError(f"unknown key '{key}'; keys are the run options without dashes: {known}")
        if value is None or (isinstance(value, str) and not value.strip() and not isinstance(
                actions[dest], argparse._StoreTrueAction)):
            continue
        action, opt = actions[dest], actions[dest].option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            if _truth(value, key):
                tokens.append(opt)
            continue
        many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
        if isinstance(value, (list, tuple)):
            values = [str(v) for v in value]
        elif many and csv_lists and isinstance(value, str):
            values = [v.strip() for v in value.split(";") if v.strip()]
        else:
            values = [str(value)]
        if not many and len(values) != 1:
            raise InputError(f"'{key}' takes one value, got {len(values)}")
        if isinstance(action, argparse._AppendAction):
            tokens += [f"{opt}={v}" for v in values]
        elif many:
            tokens += [opt, *values]
        else:
            tokens.append(f"{opt}={values[0]}")
    return tokens


def read_entries(path: str) -> list[tuple[int, dict, bool]]:
    """``(line, entry, is_csv)`` of every job of a ``.jsonl`` or ``.csv`` jobs file (blank lines and, in
    JSON lines, lines starting with ``#`` are skipped).

    Raises:
        InputError: a file that is missing or not .jsonl/.csv, or lines that are not JSON objects
            (all of them, with their line numbers).
    """
    from fantasyportrait_core.validate import check_input_file

    check_input_file(path, "JOBS", "jobs file (.jsonl or .csv)")
    ext = os.path.splitext(path)[1].lower()
    entries, errors = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        if ext in (".jsonl", ".ndjson"):
            for n, text in enumerate(f, 1):
                text = text.strip()
                if not text or text.startswith("#"):
                    continue
                try:
                    entry = json.loads(text)
                except json.JSONDecodeError as e:
                    errors.append(f"{path}:{n}: not JSON ({e.msg} at column {e.colno})")
                    continue
                if not isinstance(entry, dict):
                    errors.append(f"{path}:{n}: a job is a JSON object like {{\"image\": \"ref.png\", \"driving\": "
                                  f"[\"a.mp4\"]}}, got {type(entry).__name__}")
                    continue
                entries.append((n, entry, False))
        elif ext == ".csv":
            reader = csv.DictReader(f)
            start = 2
            for row in reader:
                n, start = start, reader.line_num + 1
                if None in row:
                    errors.append(f"{path}:{n}: more cells than the header has columns")
                    continue
                row = {k: v for k, v in row.items() if k is not None and v is not None and v.strip() != ""}
                if row:
                    entries.append((n, row, True))
        else:
            raise InputError(f"JOBS '{path}' must be a .jsonl (one JSON object a line) or .csv file")
    if errors:
        raise InputError("\n".join(errors))
    if not entries and not errors:
        raise InputError(f"JOBS '{path}' holds no job")
    return entries


def default_name(job) -> str:
    """Output name of a job without ``out``: ``IMAGE__DRIVER[+DRIVER...].mp4`` (stems)."""
    stem = lambda p: os.path.splitext(os.path.basename(p))[0]  # noqa: E731
    drivers = job.driving or job.expression
    return f"{stem(job.image)}__{'+'.join(stem(p) for p in drivers)}.mp4"


def build_jobs(path: str, out_dir: str, defaults: argparse.Namespace, line_parser: argparse.ArgumentParser,
               build) -> list[BatchJob]:
    """Every job of the jobs file, built and checked before any runs.

    Each entry is turned into ``run`` arguments (:func:`line_tokens`), parsed by ``line_parser`` on a
    copy of ``defaults`` (the batch command line), built by ``build`` (the CLI's ``job_from_args``)
    and checked by :func:`~fantasyportrait_core.runtime.plan.plan_run`; two jobs writing one output are
    refused too.

    Raises:
        InputError: one line per bad entry, ``JOBS:LINE: what is wrong``.
    """
    from fantasyportrait_core.runtime.plan import plan_run

    actions = _option_actions(line_parser)
    jobs, errors, owners = [], [], {}
    for n, entry, is_csv in read_entries(path):
        try:
            ns = line_parser.parse_args(line_tokens(entry, actions, is_csv), namespace=copy.deepcopy(defaults))
            if not ns.image or not (ns.driving or ns.expression):
                raise InputError("a job needs image and driving (or expression), here or on the command line")
            ns.command = "run"
            probe = build(argparse.Namespace(**{**vars(ns), "out": "x.mp4"}))
            name = ns.out or default_name(probe)
            ns.out = os.path.abspath(os.path.join(out_dir, name))
            job = build(ns)
            plan_run(job)
        except (InputError, FileNotFoundError) as e:
            errors.append(f"{path}:{n}: {e}")
            continue
        if job.out in owners:
            errors.append(f"{path}:{n}: writes {job.out} as line {owners[job.out]} does; give each job its own 'out'")
            continue
        owners[job.out] = n
        jobs.append(BatchJob(n, job, job.out))
    if errors:
        raise InputError(f"{len(errors)} job(s) refused, nothing run:\n" + "\n".join(errors))
    return jobs


def finished(out: str) -> bool:
    """Whether a job's output is already written (outputs are replaced atomically, so an existing
    non-empty file is a finished one)."""
    return os.path.isfile(out) and os.path.getsize(out) > 0


def _write_json(path: str, data):
    from fantasyportrait_core.media.video import atomic_write

    with atomic_write(path, ".json") as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)


def merge_report(out_dir: str, jobs_file: str, rows: list[dict]) -> dict:
    """The report of a batch: one row per job sorted by line, and counts per status."""
    rows = sorted(rows, key=lambda r: r["line"])
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {"jobs_file": os.path.abspath(jobs_file), "out_dir": os.path.abspath(out_dir), "summary": counts,
            "jobs": rows}


def run_batch(jobs: list[BatchJob], jobs_file: str, out_dir: str, load_models, stop: Stop | None = None,
              dist=None) -> dict:
    """Run ``jobs`` on one model load; write ``out_dir/batch_report.json``.

    Args:
        jobs: from :func:`build_jobs`.
        load_models: ``load_models(job) -> Models``, called once, before the first job this rank runs
            (its errors end the batch: no job could run).
        stop: the :class:`Stop` checked after each sampling step and between jobs.
        dist: a :class:`~fantasyportrait_core.runtime.parallel.Distributed` (``torchrun``) or ``None``.
    Returns:
        The merged report (on every rank: its own rows; rank 0: all rows).
    Each row: ``line``, ``out``, ``status`` (``done``, ``skipped``: the output existed, ``failed``,
    ``interrupted``, ``not run``: after a stop), ``seconds``, ``error`` (one line or ``None``), ``rank``.
    """
    from tqdm import tqdm

    from fantasyportrait_core.runtime.runner import oom_message, run_job

    stop = stop or Stop()
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    pending = []
    done = {b.line for b in jobs if finished(b.out)}
    if world > 1:  # machines without a shared folder: finished where any rank sees it; every rank deals alike
        done = set(dist.gather_rows(sorted(done)))
    for b in jobs:
        if b.line in done:
            if rank == 0:
                rows.append(dict(line=b.line, out=b.out, status="skipped", seconds=0.0,
                                 error=None, rank=rank, note="output already there"))
        else:
            pending.append(b)
    mine = pending[rank::world]  # each job on one rank: no output written twice
    part = os.path.join(out_dir, f".batch_report.rank{rank}.json") if world > 1 else os.path.join(out_dir, REPORT_NAME)
    log.info("[FantasyPortrait] batch: %d job(s), %d already done, %d to run here%s", len(jobs),
             len(jobs) - len(pending), len(mine), f" (rank {rank} of {world})" if world > 1 else "")
    # A model that cannot be loaded is no job's fault: that ends the batch (before any job).
    models = load_models(mine[0].job) if mine else None
    with tqdm(total=len(mine), desc="jobs" + (f" rank {rank}" if world > 1 else ""), unit="job",
              file=sys.stderr, dynamic_ncols=True, position=0) as bar:
        for i, b in enumerate(mine):
            if stop.requested:
                rows += [dict(line=o.line, out=o.out, status="not run", seconds=0.0, error="stopped before it",
                              rank=rank) for o in mine[i:]]
                break
            t0 = time.time()
            row = dict(line=b.line, out=b.out, status="done", seconds=0.0, error=None, rank=rank)
            try:
                from fantasyportrait_core.runtime.plan import plan_run

                plan = plan_run(b.job)
                report = run_job(b.job, models, plan, stop=stop.check)
                if report.get("output") is None:
                    row.update(status="failed", error=f"could not write the video ({report.get('error')}); frames in "
                                                      f"{report.get('fallback')}")
            except KeyboardInterrupt:
                row.update(status="interrupted", error="stopped during sampling; rerun the batch to do it")
                stop.requested = True
            except Exception as e:  # a failing job must not end the night
                import torch

                if isinstance(e, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                    msg = oom_message(b.job)
                else:
                    msg = " ".join(f"{type(e).__name__}: {e}".split())
                row.update(status="failed", error=msg)
            row["seconds"] = round(time.time() - t0, 2)
            if row["status"] == "failed":
                log.error("[FantasyPortrait] job line %d (%s) failed after %.1f s: %s", b.line,
                          os.path.basename(b.out), row["seconds"], row["error"])
            rows.append(row)
            _write_json(part, merge_report(out_dir, jobs_file, rows))
            bar.update(1)
            if stop.requested and row["status"] == "interrupted":
                rows += [dict(line=o.line, out=o.out, status="not run", seconds=0.0, error="stopped before it",
                              rank=rank) for o in mine[i + 1:]]
                break
    report = merge_report(out_dir, jobs_file, rows)
    if world == 1:
        _write_json(os.path.join(out_dir, REPORT_NAME), report)
        return report
    _write_json(part, report)
    everyone = dist.gather_rows(rows)
    if rank == 0:
        report = merge_report(out_dir, jobs_file, everyone)
        _write_json(os.path.join(out_dir, REPORT_NAME), report)
        for r in range(world):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out_dir, f".batch_report.rank{r}.json"))
    return report


def main(args: argparse.Namespace, line_parser: argparse.ArgumentParser, build) -> int:
    """``cli batch``: every line of ``args.jobs`` built (:func:`build_jobs` with ``line_parser`` and
    ``build``, the CLI's ``run`` parser and ``job_from_args``), then run on one model load
    (:func:`run_batch`), shared over the ranks under torchrun.

    Returns:
        0 (every job done or skipped), 1 (a job failed), 130 (stopped by Ctrl-C / SIGTERM).
    Raises:
        InputError: ``--out`` is a file, or malformed lines (all of them, with line numbers).
    """
    from fantasyportrait_core.runtime import runner
    from fantasyportrait_core.runtime.parallel import Distributed

    out_dir = os.path.abspath(args.out_dir)
    if os.path.isfile(out_dir):
        raise InputError(f"--out '{args.out_dir}' is a file; give the folder the outputs go to")
    # gloo: the ranks only exchange the report (no GPU collective); a week's timeout: ranks that finish
    # early wait for the slowest at the end.
    dist = Distributed.from_env(args.device, backend="gloo", timeout_s=7 * 24 * 3600)
    try:
        if dist is not None:
            args.device = dist.device_for(args.device)
        defaults = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("jobs", "out_dir")})
        jobs = build_jobs(args.jobs, out_dir, defaults, line_parser, build)

        def load_models(job):
            if job.tiny_random or not any((job.wan_dir, job.adapter, job.transformer)):
                print("RANDOM WEIGHTS: no checkpoints given, using a tiny random model (output is not a real "
                      "animation).")
                return runner.tiny_random_models(args.seed)
            return runner.real_models(job)

        stop = Stop()
        with stop.installed():
            report = run_batch(jobs, args.jobs, out_dir, load_models, stop=stop, dist=dist)
    finally:
        if dist is not None:
            dist.close()
    summary = ", ".join(f"{n} {status}" for status, n in sorted(report["summary"].items()))
    print(f"batch: {summary}; report {os.path.join(out_dir, REPORT_NAME)}")
    if stop.requested:
        return 130
    return 1 if report["summary"].get("failed") else 0


__all__ = ["BATCH_HELP", "BatchJob", "MODEL_KEYS", "REPORT_NAME", "RefusingParser", "Stop", "build_jobs",
           "default_name", "finished", "line_tokens", "main", "merge_report", "read_entries", "run_batch"]

"""A long sweep says how far it is: runs done of total, time elapsed, an estimate of the time left.

A Hydra callback (registered under ``hydra.callbacks`` in configs/train.yaml and configs/simulate.yaml), so it
works with every launcher: the sweep's start and size are written into the sweep folder by the process that
starts the sweep, and each run, wherever it ran (this process, a joblib worker, a Ray task, a Slurm job),
appends one line there when it ends and prints the sweep's progress on stderr::

    lowbw sweep: 5/12 runs done (2 skipped: already completed), 3m05s elapsed, about 7m12s left

and rewrites ``<sweep dir>/progress.json`` (the same figures, for sweeps whose runs print elsewhere: Slurm
jobs write into their own logs). The estimate is the elapsed time per run actually run so far -- runs skipped
on resume take no time -- times the runs left; it already counts runs that go in parallel.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

START_FILE = ".progress_start.json"
DONE_FILE = ".progress_runs.jsonl"
PROGRESS_FILE = "progress.json"


def count_jobs(config: DictConfig) -> Optional[int]:
    """How many runs the sweep will launch, or None when this sweeper's size cannot be told in advance.

    Hydra's basic sweeper runs the cartesian product of its ``params`` and the command line's overrides (a
    later value of a key replaces an earlier one); Optuna's runs ``n_trials``."""
    sweeper = OmegaConf.select(config, "hydra.sweeper", default=None) or {}
    target = str(sweeper.get("_target_", ""))
    if "optuna" in target.lower():
        n = sweeper.get("n_trials")
        return int(n) if n is not None else None
    if not target.endswith("BasicSweeper"):
        return None
    args = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    args += list(OmegaConf.select(config, "hydra.overrides.task", default=[]) or [])
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception:  # noqa: BLE001 -- a sweep the parser needs the config for (glob): size unknown
        return None
    sizes: dict[str, int] = {}
    for o in overrides:
        sizes[o.get_key_element()] = len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1
    return math.prod(sizes.values())


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress(sweep_dir: Path, now: Optional[float] = None) -> Optional[dict]:
    """The sweep's figures from its folder, or None when the sweep did not record its start."""
    try:
        start = json.loads((sweep_dir / START_FILE).read_text())
    except (OSError, ValueError):
        return None
    runs = []
    try:
        with open(sweep_dir / DONE_FILE) as f:
            for line in f:
                try:
                    runs.append(json.loads(line))
                except ValueError:  # a line being written by another process
                    continue
    except OSError:
        pass
    now = time.time() if now is None else now
    done = len({r["job"] for r in runs})
    ran = len({r["job"] for r in runs if r.get("ran")})
    total, elapsed = start.get("total"), now - start["start"]
    left = None
    if total is not None and ran > 0:
        left = elapsed / ran * max(0, total - done)
    return {"done": done, "total": total, "skipped": done - ran, "failed": sum(r.get("status") == "failed"
                                                                                 for r in runs),
            "elapsed_s": elapsed, "left_s": left}


def progress_line(p: dict) -> str:
    of = f"/{p['total']}" if p["total"] is not None else ""
    notes = [f"{p['skipped']} skipped: already completed"] if p["skipped"] else []
    notes += [f"{p['failed']} failed"] if p["failed"] else []
    line = f"lowbw sweep: {p['done']}{of} runs done" + (f" ({', '.join(notes)})" if notes else "")
    line += f", {_clock(p['elapsed_s'])} elapsed"
    if p["total"] is not None and p["done"] >= p["total"]:
        return line
    if p["left_s"] is not None:
        return line + f", about {_clock(p['left_s'])} left"
    return line + (", no estimate before a run has run" if p["total"] is not None else "")


class SweepProgress(Callback):
    """Hydra callback: progress of a multirun, after every run (see the module docstring)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / DONE_FILE).write_text("")  # a rerun into the same folder counts afresh
        (sweep_dir / START_FILE).write_text(json.dumps({"start": time.time(), "total": count_jobs(config)}))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not (sweep_dir / START_FILE).is_file():
            return
        start = json.loads((sweep_dir / START_FILE).read_text())["start"]
        run_dir = Path(str(OmegaConf.select(config, "out_dir", default=None) or config.hydra.runtime.output_dir))
        summary = run_dir / "summary.json"
        ran = not summary.is_file() or summary.stat().st_mtime >= start  # an older summary: skipped on resume
        status = "failed"
        try:
            status = json.loads(summary.read_text()).get("status", "failed")
        except (OSError, ValueError):
            pass
        line = json.dumps({"job": int(config.hydra.job.num), "ran": ran, "status": status, "t": time.time()})
        with open(sweep_dir / DONE_FILE, "a") as f:  # one short append per run: whole lines across processes
            f.write(line + "\n")
        p = progress(sweep_dir)
        if p is None:
            return
        tmp = sweep_dir / f".{PROGRESS_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(p, indent=1))
        os.replace(tmp, sweep_dir / PROGRESS_FILE)
        print(progress_line(p), file=sys.stderr, flush=True)

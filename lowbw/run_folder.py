"""The run folder before a run starts: writable, never overwriting a finished run, resumable as asked.

Everything here happens in the launching process, before any rank exists, and raises
:class:`~lowbw.errors.ConfigError` with one sentence when the folder cannot be used:

- :func:`check_writable`: ``out_dir`` is a folder this process can create and write in (not a file,
  not read-only).
- :func:`prepare`: a fresh run into a folder holding an earlier run moves that run's files into
  ``attempt<k>/`` first; ``resume=true`` checks that every rank's checkpoint is readable and was
  written with the same settings (:func:`lowbw.checkpoint.check_resume_config`), and when the folder
  holds a *completed* run, copies it into ``attempt<k>/`` before the resumed run may touch it -- so a
  finished run's results survive whatever happens to a later run in its folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lowbw.checkpoint import check_resume_config, checkpoint_dir, recorded_config, resume_step
from lowbw.errors import ConfigError

#: A run's own files in its folder (what an earlier run leaves and a later one would overwrite).
RUN_FILES = ("summary.json", "metrics.jsonl", "timeline.jsonl", "config.yaml", "provenance.json", "trace.json",
             "timeline.png", "tb", "errors", "checkpoints")


def check_writable(run_dir: Path) -> None:
    """ConfigError unless ``run_dir`` is (or can be made) a folder this process can write in."""
    where = f"out_dir={str(run_dir)!r}"
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{where} is a file, not a folder; give a folder for the run's files")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".lowbw-probe-"):
            pass
    except OSError as e:
        raise ConfigError(f"{where} cannot be written ({e.strerror or e}); give a folder you can write to") from None


def _summary(run_dir: Path) -> dict:
    try:
        s = json.loads((run_dir / "summary.json").read_text())
        return s if isinstance(s, dict) else {}
    except (OSError, ValueError):
        return {}


def set_aside(run_dir: Path, copy: bool = False) -> Path | None:
    """Move (or copy) the run files in ``run_dir`` into a new ``attempt<k>/``; return it (None: nothing there)."""
    present = [n for n in RUN_FILES if (run_dir / n).exists()]
    if not present:
        return None
    k = 1
    while (run_dir / f"attempt{k}").exists():
        k += 1
    dest = run_dir / f"attempt{k}"
    dest.mkdir(parents=True)
    for n in present:
        src = run_dir / n
        if not copy:
            os.replace(src, dest / n)
        elif n != "checkpoints":  # the resumed run reads them; they are kept (checkpoint.keep) in place
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest / n)
    return dest


def check_resume(cfg: Any, run_dir: Path, world: int) -> None:
    """Before a resume starts anything: the checkpoints exist, every rank's is readable, and they were
    written with settings this run may resume (ConfigError naming what differs)."""
    root = checkpoint_dir(cfg, run_dir)
    new = OmegaConf.to_container(cfg, resolve=True)
    recorded = recorded_config(root)
    if recorded is None and (run_dir / "config.yaml").is_file():  # checkpoints from before configs were kept
        recorded = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    if recorded is not None:
        check_resume_config(recorded, new)
    resume_step(root, world)


def prepare(cfg: Any, run_dir: Path, world: int) -> None:
    """Make ``run_dir`` ready for this run (see the module's docstring)."""
    check_writable(run_dir)
    if not cfg.resume:
        set_aside(run_dir)
        return
    check_resume(cfg, run_dir, world)
    done = _summary(run_dir)
    if done.get("status") == "completed":
        if done.get("steps_completed", 0) >= cfg.train.steps:
            raise ConfigError(f"resume=true: {run_dir} already holds a completed run of {done.get('steps_completed')} "
                              f"steps (train.steps={cfg.train.steps}); raise train.steps to continue it")
        set_aside(run_dir, copy=True)  # the finished run stays whole whatever happens next

"""Per-rank checkpoints: written atomically, read without pickle, checked before a resume.

Each rank saves ``<dir>/rank<r>/step<k>.pt`` after step k: its stages' weights, the optimizer, every
codec's state, its clock and link-model state (so that a resumed run's timing continues exactly),
on rank 0 the recorder's running totals, and the run's whole config (as JSON text). A file is written
to a temporary name and renamed, so a crash mid-write never leaves a half-written checkpoint under a
real name (nor a temporary one). Files are read with ``torch.load(weights_only=True)``: tensors and
plain containers only, no code from the file runs.

Before a resume starts any process, :func:`check_resume_config` compares the config the checkpoint
was written with to the new one: only the settings in :data:`MAY_CHANGE_ON_RESUME` may differ (how
long to train, how often to evaluate and checkpoint, logging, timeouts, where files go, energy
accounting, the crash that ended the first attempt); any other difference is refused, naming it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from lowbw.errors import ConfigError

#: Settings (a name or a group prefix ending in ".") a resumed run may change: they decide how long the
#: run goes on, what is measured or logged and where files go -- not the training that already happened.
MAY_CHANGE_ON_RESUME = (
    "train.steps", "train.eval_interval", "train.eval_batches", "train.warmup_steps",
    "checkpoint.", "resume", "progress", "timeout_s", "out_dir", "device",
    "compress.error_every", "compress.baseline_run", "energy.", "faults.crash_rank", "faults.crash_step",
)

_NAME = re.compile(r"^step(\d{8})\.pt$")


def checkpoint_dir(cfg: Any, run_dir: Optional[Path]) -> Optional[Path]:
    if cfg.checkpoint.dir:
        return Path(cfg.checkpoint.dir).expanduser()
    return run_dir / "checkpoints" if run_dir is not None else None


def steps(root: Path, rank: int) -> list[int]:
    d = root / f"rank{rank}"
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for f in d.iterdir() if (m := _NAME.match(f.name)))


def save(root: Path, rank: int, step: int, state: dict, keep: int) -> Path:
    d = root / f"rank{rank}"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step{step:08d}.pt"
    tmp = d / f".step{step:08d}.pt.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk or a stop signal mid-write: no temporary file left behind
        tmp.unlink(missing_ok=True)
        raise
    for old in steps(root, rank)[:-keep]:
        (d / f"step{old:08d}.pt").unlink(missing_ok=True)
    return path


def load(root: Path, rank: int, step: int) -> dict:
    path = root / f"rank{rank}" / f"step{step:08d}.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- truncated, corrupted or not a checkpoint at all
        raise ConfigError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            f"it is corrupted or truncated: delete it to resume from an earlier one, or start afresh with resume=false"
        ) from None


def resume_step(root: Optional[Path], world: int) -> int:
    """The newest step every rank has a readable checkpoint of; ConfigError if there is none."""
    if root is None or not root.is_dir():
        raise ConfigError(f"resume=true but there is no checkpoint folder {root}; set out_dir to the run's folder "
                          "(or checkpoint.dir) and make sure the run had checkpoint.every > 0")
    common = None
    for r in range(world):
        have = set(steps(root, r))
        common = have if common is None else common & have
    if not common:
        raise ConfigError(f"resume=true but {root} holds no step checkpointed by all {world} ranks")
    step = max(common)
    for r in range(world):
        load(root, r, step)  # every file must be readable before anything is overwritten
    return step


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def recorded_config(root: Optional[Path]) -> Optional[dict]:
    """The config the newest checkpoint of rank 0 under ``root`` was written with (None: none recorded)."""
    have = steps(root, 0) if root is not None and root.is_dir() else []
    if not have:
        return None
    text = load(root, 0, have[-1]).get("config")
    return json.loads(text) if isinstance(text, str) else None


def check_resume_config(recorded: dict, new: dict) -> None:
    """ConfigError naming every setting that differs between the checkpoint's run and this one, unless
    it may change on resume."""
    old_f, new_f = _flat(recorded), _flat(new)
    changed = sorted(k for k in set(old_f) | set(new_f)
                     if old_f.get(k, "<unset>") != new_f.get(k, "<unset>")
                     and not any(k == m or (m.endswith(".") and k.startswith(m)) for m in MAY_CHANGE_ON_RESUME))
    if changed:
        shown = ", ".join(f"{k}={old_f.get(k, '<unset>')!r} (now {new_f.get(k, '<unset>')!r})" for k in changed[:8])
        more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
        raise ConfigError(
            f"resume=true: the checkpoints were written by a run with other settings: {shown}{more}; resume with "
            "the same settings (only steps, evaluation, checkpointing, logging, timeouts, device, energy "
            "accounting and the crash fault may change), or start afresh with resume=false in another out_dir"
        )

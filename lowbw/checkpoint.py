"""Per-rank checkpoints: written atomically, read without pickle, checked before a resume.

Each rank saves ``<dir>/rank<r>/step<k>.pt`` after step k: its stages' weights, the optimizer, every
codec's state, its clock and link-model state (so that a resumed run's timing continues exactly),
and on rank 0 the recorder's running totals. A file is written to a temporary name and renamed, so
a crash mid-write never leaves a half-written checkpoint under a real name. Files are read with
``torch.load(weights_only=True)``: tensors and plain containers only, no code from the file runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from lowbw.errors import ConfigError

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
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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

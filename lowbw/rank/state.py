"""A rank's state in a checkpoint: what a resumed run needs to continue exactly.

Weights and optimizer state of every held stage, every codec's state (error-feedback residuals,
caches, warm starts), the replica synchronisation's state (lowbw.replicas), the run clock and the link model's queues and jitter streams (so that step
times continue exactly), and on rank 0 the recorder's running totals. Files are written and read
by lowbw.checkpoint (atomic, read without pickle).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lowbw.checkpoint import load, save, steps
from lowbw.config import plain
from lowbw.rank.build import Rank
from lowbw.rank.reporting import Reporting


def _codec_states(r: Rank) -> dict[str, dict]:
    return {f"{s}.{role}": state for s, st in r.stages.items() for role, state in st.codecs.state_dict().items()}


def save_rank(r: Rank, reporting: Reporting, root: Path, step: int) -> None:
    state = {
        "step": step,
        "model": {str(s): st.module.state_dict() for s, st in r.stages.items()},
        "optimizer": r.optimizer.state_dict(),
        "codecs": _codec_states(r),
        "sync": r.sync.state_dict(),  # a DiLoCo round's start and outer momentum, residuals of the replica axis
        "clock": r.clock.now(),
        "link": r.link.state_dict() if r.link is not None else None,
        "recorder": reporting.state_dict(),
        "config": json.dumps(plain(r.cfg)),  # compared with a resumed run's before it starts
    }
    save(root, r.rank, step, state, r.cfg.checkpoint.keep)


def restore_rank(r: Rank, reporting: Reporting, root: Path) -> tuple[int, float]:
    """Load the newest checkpoint all ranks share; return (first step to run, clock time to resume at)."""
    have = steps(root, r.rank) if root is not None else []
    mine = torch.tensor([have[-1] if have else -1])
    r.watch.collective(r.rank, "the resume all-reduce",
                       lambda: dist.all_reduce(mine, op=dist.ReduceOp.MIN, async_op=True), r.cfg.timeout_s)
    step = int(mine.item())
    if step < 0:
        raise RuntimeError(f"resume=true but rank {r.rank} finds no checkpoint every rank has under {root}")
    state = load(root, r.rank, step)
    for s, st in r.stages.items():
        st.module.load_state_dict(state["model"][str(s)])
        st.codecs.load_state_dict({role: state["codecs"][f"{s}.{role}"] for role in st.codecs.state_dict()})
    r.optimizer.load_state_dict(state["optimizer"])
    r.sync.load_state_dict(state.get("sync") or {})
    if r.link is not None and state["link"] is not None:
        r.link.load_state_dict(state["link"])
    reporting.load_state_dict(state["recorder"])
    print(f"lowbw: rank {r.rank} resumes after step {step} from {root}", file=sys.stderr, flush=True)
    return step + 1, float(state["clock"])

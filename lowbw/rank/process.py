"""A rank's process: join the group, build the rank, run the loop, exit -- naming the rank on failure.

Called in every process, whoever started it: lowbw's own launcher (``init`` gives the rendezvous
address it chose) or torchrun (the group comes from its environment, and rank 0's run folder is
broadcast to everyone). A failure anywhere ends this process with a one-line error naming the rank
and, where it can, an ``errors/rank<r>.json`` the launcher reads to blame the right rank.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from lowbw.config import SCRATCH_ENV
from lowbw.rank.build import build_rank
from lowbw.rank.loop import train
from lowbw.rank.reporting import RecordOnRankZero, SendToRankZero, describe
from lowbw.validation import Plan


def train_rank(cfg: Any, plan: Plan, rank: int, world: int, run_dir: Optional[Path], local_rank: int,
               meta: dict) -> Optional[dict]:
    """Build this rank and train; the summary on rank 0."""
    r = build_rank(cfg, plan, rank, world, local_rank)
    reporting = (RecordOnRankZero(r.transport, world, cfg, run_dir, meta) if rank == 0
                 else SendToRankZero(r.transport, rank, world))
    return train(r, reporting, run_dir)


def _join_group(cfg: Any, rank: int, world: int, init: Optional[dict], run_dir: Optional[str]) -> Optional[str]:
    """Set up the gloo group; under torchrun return rank 0's run folder (everyone writes there)."""
    timeout = timedelta(seconds=cfg.timeout_s)
    if init is not None:  # lowbw's own launcher: rendezvous on the address it chose
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = init["addr"], str(init["port"])
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
        return run_dir
    dist.init_process_group("gloo", timeout=timeout)
    shared = [run_dir if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def run_rank(cfg_dict: dict, plan: Plan, rank: int, world: int, run_dir: Optional[str], local_rank: int,
             meta: dict, init: Optional[dict] = None) -> None:
    """Process entry: set up the group, train, exit. Never returns on failure: exits non-zero."""
    torch.set_num_threads(1)
    cfg = OmegaConf.create(cfg_dict)
    err_dir = Path(run_dir) / "errors" if run_dir else None
    try:
        run_dir = _join_group(cfg, rank, world, init, run_dir)
        if init is None:
            err_dir = Path(run_dir) / "errors" if rank == 0 else None
        train_rank(cfg, plan, rank, world, Path(run_dir) if run_dir else None, local_rank, meta)
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 -- turned into one readable line naming the rank
        msg = describe(e, rank)
        print(f"lowbw: {msg}", file=sys.stderr, flush=True)
        if os.environ.get("LOWBW_TRACEBACK"):
            traceback.print_exc()
        if err_dir is not None:
            try:
                err_dir.mkdir(parents=True, exist_ok=True)
                (err_dir / f"rank{rank}.json").write_text(
                    json.dumps({"rank": rank, "error": msg, "peer": getattr(e, "peer", None)}))
            except OSError:
                pass
        sys.stdout.flush()
        if os.environ.get(SCRATCH_ENV):  # os._exit skips atexit: remove a torchrun rank's scratch folder here
            shutil.rmtree(os.environ[SCRATCH_ENV], ignore_errors=True)
        os._exit(1)  # threads blocked in gloo must not keep a failed rank alive

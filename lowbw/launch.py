"""Start one process per stage on this machine and watch them (runs without torchrun).

The parent validates nothing itself (train.py has done that), chooses a free loopback port,
spawns the ranks and polls them. The first rank to fail decides the outcome: the others are
terminated at once (then killed if they linger), and :class:`RunFailed` names the rank that
caused it -- the rank that crashed, not the peers that merely noticed. No process is left behind.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
import time
from pathlib import Path
from typing import Optional

from lowbw.metrics.recorder import atomic_write_json
from lowbw.rank.process import run_rank
from lowbw.validation import Plan


class RunFailed(RuntimeError):
    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.rank = rank


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _blame(run_dir: Path, failed: dict[int, int]) -> tuple[int, str]:
    """Pick the root cause among failed ranks: one not blaming a peer, else the peer blamed."""
    errors = {}
    for f in (run_dir / "errors").glob("rank*.json") if (run_dir / "errors").is_dir() else []:
        try:
            e = json.loads(f.read_text())
            errors[int(e["rank"])] = e
        except (OSError, ValueError, KeyError):
            continue
    for rank in sorted(failed):
        if rank not in errors:  # died without a word (killed, os._exit, segfault)
            return rank, f"rank {rank} exited with code {failed[rank]} without reporting an error"
    for rank in sorted(failed):
        if errors[rank].get("peer") is None:
            return rank, errors[rank]["error"]
    peer = errors[min(failed)]["peer"]
    return peer, f"rank {peer} stopped answering: {errors[min(failed)]['error']}"


def spawn_and_supervise(cfg_dict: dict, plan: Plan, world: int, run_dir: Path, meta: dict, grace_s: float = 5.0,
                        settle_s: float = 2.0) -> None:
    ctx = mp.get_context("spawn")
    init = {"addr": "127.0.0.1", "port": free_port()}
    procs = [
        ctx.Process(target=run_rank, args=(cfg_dict, plan, r, world, str(run_dir), r, meta, init), name=f"lowbw-rank{r}")
        for r in range(world)
    ]
    for p in procs:
        p.start()
    failed: dict[int, int] = {}
    try:
        first_failure = None
        while True:
            codes = [p.exitcode for p in procs]
            failed = {r: c for r, c in enumerate(codes) if c not in (None, 0)}
            if all(c is not None for c in codes):
                break
            if failed and first_failure is None:
                first_failure = time.monotonic()
            # After a first failure, give the peers a moment to notice and report on their own, so
            # that ranks we terminate below are not mistaken for the cause.
            if first_failure is not None and time.monotonic() - first_failure > settle_s:
                break
            time.sleep(0.05)
    finally:
        stop_processes(procs, grace_s)
    if failed:
        rank, message = _blame(run_dir, failed)
        raise RunFailed(rank, message)


def stop_processes(procs: list, grace_s: float) -> None:
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in alive:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(1.0)


def mark_failed(run_dir: Path, rank: Optional[int], message: str) -> None:
    """Record a failure in summary.json, keeping what rank 0 already wrote (never half-written)."""
    path = run_dir / "summary.json"
    summary = {}
    if path.is_file():
        try:
            summary = json.loads(path.read_text())
        except ValueError:
            summary = {}
    summary.update({"status": "failed", "error": message, "failed_rank": rank})
    atomic_write_json(path, summary)

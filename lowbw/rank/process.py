"""A rank's process: join the group, build the rank, run the loop, exit -- naming the rank on failure.

Called in every process, whoever started it: lowbw's own launcher (``init`` holds its private
rendezvous folder, the loopback interface and its own pid) or torchrun (the group comes from its
environment, and rank 0's run folder is shared through torchrun's store as JSON). A failure anywhere
ends this process with a one-line error naming the rank (the traceback only with LOWBW_TRACEBACK=1)
and an exit code saying what happened (lowbw.errors); lowbw's launcher also gets the error as one
JSON line on a pipe of its own (no disk needed: a full disk must not hide why a run failed), and
``errors/rank<r>.json`` keeps it in the run folder when it can be written.

Stop signals: the first SIGINT or SIGTERM raises :class:`~lowbw.errors.Interrupted` in the main
thread; rank 0 then records the run as ``interrupted`` and every rank exits with 128 + the signal's
number. A rank started by lowbw's launcher also stops (the same way) when the launcher disappears,
so that no rank outlives it, even when it was killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from lowbw.config import SCRATCH_ENV
from lowbw.errors import (EXIT_DIVERGED, EXIT_FAILED, Diverged, Interrupted, PeerError, ignore_stop_signals,
                          stop_signals_raise)
from lowbw.metrics.files import atomic_write_json
from lowbw.net.kernel import enter_namespace
from lowbw.net.liveness import STARTUP_S, Heartbeat
from lowbw.net.wire import GLOO_TIMEOUT
from lowbw.rank.build import build_rank
from lowbw.rank.launcher_watch import as_stop, watch_launcher
from lowbw.rank.loop import train
from lowbw.rank.reporting import RecordOnRankZero, SendToRankZero, describe
from lowbw.validation import Plan


SWITCH_INTERVAL_S = 5e-4  # wall seconds; see run_rank


def train_rank(cfg: Any, plan: Plan, rank: int, world: int, run_dir: Optional[Path], local_rank: int,
               meta: dict, watch: Optional[Heartbeat] = None) -> Optional[dict]:
    """Build this rank and train; the summary on rank 0."""
    r = build_rank(cfg, plan, rank, world, local_rank, watch=watch)
    reporting = (RecordOnRankZero(r.transport, world, cfg, run_dir, meta, plan.regime) if rank == 0
                 else SendToRankZero(r.transport, rank, world))
    return train(r, reporting, run_dir)


def _stores(cfg: Any, world: int, init: Optional[dict]) -> dist.Store:
    """The store heartbeats (and, under torchrun, the run folder) go through: a file in the launcher's
    private folder, or a client of torchrun's own TCP store. Values are JSON text."""
    timeout = timedelta(seconds=cfg.timeout_s)
    if init is not None:
        return dist.FileStore(str(Path(init["dir"]) / "live"), world)
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"lowbw/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


def _await_peers(store: dist.Store, rank: int, world: int) -> None:
    """Wait until every rank's process is up, so that the group forms within timeout_s however long
    start-up took."""
    store.set(f"up/{rank}", "1")
    store.wait([f"up/{r}" for r in range(world)], timedelta(seconds=STARTUP_S))


def _join_group(cfg: Any, rank: int, world: int, init: Optional[dict], run_dir: Optional[str],
                store: dist.Store) -> Optional[str]:
    """Set up the gloo group; under torchrun return rank 0's run folder (everyone writes there)."""
    timeout = GLOO_TIMEOUT
    _await_peers(store, rank, world)
    if init is not None:  # lowbw's launcher: a file store (no listening socket), gloo on the loopback interface
        os.environ["GLOO_SOCKET_IFNAME"] = init["ifname"]
        dist.init_process_group("gloo", init_method=f"file://{Path(init['dir']) / 'store'}", rank=rank,
                                world_size=world, timeout=timeout)
        return run_dir
    dist.init_process_group("gloo", timeout=timeout)
    if rank == 0:
        store.set("run_dir", json.dumps(run_dir))
    return json.loads(store.get("run_dir").decode())  # JSON, never a pickle from a peer


def adopt_environment(env: dict[str, str]) -> None:
    """Make this process's environment ``env`` (the launcher's): a rank forked from the fork server
    would otherwise see the server's, as it was when the server started (lowbw.launch)."""
    if env != dict(os.environ):
        os.environ.clear()
        os.environ.update(env)


def _exit_code(e: BaseException) -> int:
    if isinstance(e, Interrupted):
        return e.exit_code
    return EXIT_DIVERGED if isinstance(e, Diverged) else EXIT_FAILED


def _report(e: BaseException, rank: int, err_dir: Optional[Path], pipe: Optional[Connection]) -> None:
    """One line on stderr, one JSON line to the launcher, errors/rank<r>.json where it can be written."""
    msg = describe(e, rank)
    kind = ("interrupted" if isinstance(e, Interrupted) else "diverged" if isinstance(e, Diverged)
            else getattr(e, "kind", "") or "error")
    record = {"rank": rank, "error": msg, "kind": kind, "peer": e.peer if isinstance(e, PeerError) else None,
              "link": getattr(e, "link", None), "step": getattr(e, "step", None)}
    print(f"lowbw: {msg}", file=sys.stderr, flush=True)
    if os.environ.get("LOWBW_TRACEBACK") and not isinstance(e, Interrupted):
        traceback.print_exception(e)
    if err_dir is not None and not isinstance(e, Interrupted):  # first: the launcher stops us once told
        try:
            err_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(err_dir / f"rank{rank}.json", record)
        except OSError:
            pass
    if pipe is not None:
        try:
            pipe.send_bytes(json.dumps(record).encode())
        except OSError:
            pass


def run_rank(cfg_dict: dict, plan: Plan, rank: int, world: int, run_dir: Optional[str], local_rank: int,
             meta: dict, init: Optional[dict] = None, pipe: Optional[Connection] = None) -> Optional[dict]:
    """Process entry: set up the group, train; the summary on rank 0. Never returns on failure: exits with
    the code of what happened (lowbw.errors)."""
    if init is not None and init.get("netns"):  # first: threads started later inherit the namespace
        enter_namespace(init["netns"])
    if init is not None and "env" in init:
        adopt_environment(init["env"])
    torch.set_num_threads(1)
    # A rank's other threads (rank 0's collector, TensorBoard's writer, the heartbeat) take the GIL while the
    # compute thread is inside torch; Python makes a thread that wants it back wait up to the switch interval
    # (5 ms by default) before the holder lets go. At 0.5 ms: interleaved 1F1B in scripts/bench_overhead.py
    # 80.2-82.8 ms a step against 83.3-85.2 (alternating, 3 pairs), 1F1B unchanged.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    cfg = OmegaConf.create(cfg_dict)
    err_dir = Path(run_dir) / "errors" if run_dir else None
    with stop_signals_raise():
        watch = None
        try:
            if init is not None:
                watch_launcher(init["parent_pid"])
            store = _stores(cfg, world, init)
            run_dir = _join_group(cfg, rank, world, init, run_dir, store)
            if init is None:
                err_dir = Path(run_dir) / "errors" if rank == 0 else None
            watch = Heartbeat(store, rank, world, cfg.timeout_s).start()
            summary = train_rank(cfg, plan, rank, world, Path(run_dir) if run_dir else None, local_rank, meta,
                                 watch)
            watch.close()
            if dist.is_initialized():
                dist.destroy_process_group()
            return summary
        except BaseException as e:  # noqa: BLE001 -- turned into one readable line naming the rank
            ignore_stop_signals()  # the report below is not cut short
            e = as_stop(e)
            if watch is not None:
                watch.stop()
            _report(e, rank, err_dir, pipe)
            sys.stdout.flush()
            if os.environ.get(SCRATCH_ENV):  # os._exit skips atexit: remove a torchrun rank's scratch folder here
                shutil.rmtree(os.environ[SCRATCH_ENV], ignore_errors=True)
            os._exit(_exit_code(e))  # threads blocked in gloo must not keep a failed rank alive

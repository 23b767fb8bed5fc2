"""Start one process per stage on this machine and watch them (runs without torchrun).

The parent validates nothing itself (train.py has done that). It makes a private rendezvous folder
(mode 0700: a file store, so no socket listens anywhere; gloo is bound to the loopback interface),
spawns the ranks and polls them, reading each rank's error -- one JSON line -- from a pipe of its own.

- A rank fails: the others get ``settle_s`` to notice and report, then all are stopped (SIGTERM,
  SIGCONT for a stopped one, SIGKILL after ``grace_s``), and :class:`RunFailed` names the rank that
  caused it -- the one that died without a word, failed on its own, or that the others' heartbeats
  found silent (lowbw.net.liveness) -- or the link that delivered nothing.
- SIGINT or SIGTERM reaches the launcher: it passes the signal on to every rank, waits ``grace_s`` for
  rank 0 to record the run as ``interrupted``, kills what is left, and raises
  :class:`~lowbw.errors.Interrupted`.
- Every rank reports divergence: :class:`~lowbw.errors.Diverged`.

No process is left behind: the ranks also stop by themselves when the launcher disappears.

With ``net.backend=kernel`` the launcher first makes the run's network namespaces, veth pairs, bridge
and qdiscs (lowbw.net.kernel), starts each rank in its own namespace, and removes them all when the
run ends, fails or is interrupted.

Ranks start from multiprocessing's fork server where the platform has one (:func:`rank_context`): the
server imports torch and lowbw once, and each rank is a fork of it -- a fraction of a second instead
of the ~4 s of CPU an interpreter takes to import torch (measured on a 2-core VM), for every rank of
every run a process starts. A fork server's children inherit the server's environment, not the
launcher's current one, so the launcher sends its environment along and each rank adopts it first
(:func:`lowbw.rank.process.adopt_environment`). Where there is no fork server (Windows), ranks spawn.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from lowbw.errors import STOP_SIGNALS, Diverged, Interrupted
from lowbw.metrics.files import atomic_write_json, read_json_lines
from lowbw.net.kernel import KernelNetwork
from lowbw.net.shm import SHM_DIR, sweep_stale
from lowbw.rank.process import run_rank
from lowbw.validation import Plan


class RunFailed(RuntimeError):
    def __init__(self, rank: Optional[int], message: str, link: Optional[str] = None):
        super().__init__(message)
        self.rank, self.link = rank, link


#: What every rank imports: loaded once in the fork server, so a rank starts with it imported.
RANK_PRELOAD = ["lowbw.rank.process"]


def rank_context() -> mp.context.BaseContext:
    """The multiprocessing context ranks start in: the fork server, preloaded with :data:`RANK_PRELOAD`
    (falls back to spawn where the platform has no fork server). The server is started by the first
    process and serves every later run of this process; it exits when this process does."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(RANK_PRELOAD)
    return ctx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def loopback_interface() -> str:
    """The name of the loopback interface (``lo`` on Linux, ``lo0`` on macOS), for GLOO_SOCKET_IFNAME."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n in ("lo", "lo0")), next((n for n in names if n.startswith("lo")), "lo"))


def _exit_text(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _blame(reports: dict[int, dict], failed: dict[int, int],
           running: set[int]) -> tuple[Optional[int], str, Optional[str]]:
    """(rank, sentence, link) of the root cause among the failed ranks and their reports."""
    silent = sorted(r for r in failed if r not in reports)
    if silent:  # died without a word (killed, os._exit, segfault)
        return silent[0], f"rank {silent[0]} {_exit_text(failed[silent[0]])} without reporting an error", None
    own = [r for r in sorted(reports) if reports[r].get("peer") is None and reports[r]["kind"] != "link"]
    if own:
        return own[0], reports[own[0]]["error"], None
    # every report blames a peer: a rank that reported is alive enough not to be the cause
    for kinds in (("hung", "dead"), ("slow", "error", "")):
        blamed = sorted({rep["peer"] for rep in reports.values() if rep["kind"] in kinds} - set(reports))
        if blamed:
            r = blamed[0]
            rep = next(rep for rep in reports.values() if rep["peer"] == r and rep["kind"] in kinds)
            state = ("; its process was still running (it hangs) and was stopped" if r in running
                     else f"; its process {_exit_text(failed[r])}" if r in failed else "")
            return r, rep["error"] + state, None
    links = sorted((rep.get("link") is None, r, rep) for r, rep in reports.items() if rep["kind"] == "link")
    links = [rep for _, _, rep in links]  # a report naming the link first
    if links:
        return None, links[0]["error"], links[0].get("link")
    r = min(reports)
    return reports[r]["peer"], reports[r]["error"], None


class _StopRequest:
    """Remembers the first SIGINT/SIGTERM the launcher gets (the poll loop acts on it)."""

    def __init__(self):
        self.signum: Optional[int] = None

    def __enter__(self) -> "_StopRequest":
        def handler(signum, frame):  # noqa: ARG001
            if self.signum is None:
                self.signum = signum
        # Python lets only the main thread set handlers (a sweep's worker thread leaves them to its parent)
        main = threading.current_thread() is threading.main_thread()
        self._old = {s: signal.signal(s, handler) for s in STOP_SIGNALS} if main else {}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _read_reports(pipes: list, reports: dict[int, dict]) -> None:
    for r, conn in enumerate(pipes):
        try:
            while conn.poll():
                reports[r] = json.loads(conn.recv_bytes().decode())
        except (EOFError, OSError, ValueError):
            continue


def _supervise(procs: list, pipes: list, stop: _StopRequest, reports: dict, grace_s: float,
               settle_s: float) -> tuple[dict[int, int], set[int]]:
    """Poll until every rank exited, a failure has settled, or a stop request has had its grace.
    Returns (failed ranks -> exit code, ranks still running) at that moment."""
    first_failure = forwarded_at = None
    while True:
        _read_reports(pipes, reports)
        codes = [p.exitcode for p in procs]
        failed = {r: c for r, c in enumerate(codes) if c not in (None, 0)}
        running = {r for r, c in enumerate(codes) if c is None}
        now = time.monotonic()
        if not running:
            return failed, running
        if stop.signum is not None and forwarded_at is None:
            for r in running:
                os.kill(procs[r].pid, stop.signum)
            forwarded_at = now
        if forwarded_at is not None:
            if now - forwarded_at > grace_s:
                return failed, running
        elif failed:
            first_failure = first_failure or now
            # Give the peers a moment to notice and report on their own, so that ranks stopped below are
            # not mistaken for the cause, and rank 0 (which reports only once it has recorded the run)
            # up to grace_s more to finish its record.
            recorded = 0 in reports or 0 not in running
            if now - first_failure > settle_s + (0.0 if recorded else grace_s):
                return failed, running
        time.sleep(0.05)


def spawn_and_supervise(cfg_dict: dict, plan: Plan, world: int, run_dir: Path, meta: dict, grace_s: float = 10.0,
                        settle_s: float = 2.0) -> None:
    """Run the ranks to the end. Raises RunFailed, Diverged or Interrupted (after recording it in
    summary.json if rank 0 could not)."""
    kernel = (cfg_dict.get("net") or {}).get("backend", "emulated") == "kernel"
    with KernelNetwork(plan.topology) if kernel else contextlib.nullcontext() as network:
        _spawn_and_supervise(cfg_dict, plan, world, run_dir, meta, grace_s, settle_s, network)


def _spawn_and_supervise(cfg_dict: dict, plan: Plan, world: int, run_dir: Path, meta: dict, grace_s: float,
                         settle_s: float, network: Optional[KernelNetwork]) -> None:
    rdv = Path(tempfile.mkdtemp(prefix="lowbw-rdv-"))  # mode 0700: only this user reaches the store
    ctx = rank_context()
    pipes = [ctx.Pipe(duplex=False) for _ in range(world)]
    init = {"dir": str(rdv), "ifname": loopback_interface(), "parent_pid": os.getpid(), "env": dict(os.environ)}
    inits = [{**init, **network.rank_init(r)} if network is not None else init for r in range(world)]
    procs = [ctx.Process(target=run_rank, args=(cfg_dict, plan, r, world, str(run_dir), r, meta, inits[r],
                                                pipes[r][1]), name=f"lowbw-rank{r}") for r in range(world)]
    reports: dict[int, dict] = {}
    try:
        with _StopRequest() as stop:
            for p in procs:
                p.start()
            for _, w in pipes:
                w.close()  # the children hold their ends
            failed, running = _supervise(procs, [r for r, _ in pipes], stop, reports, grace_s, settle_s)
            stop_processes(procs, grace_s)
            _read_reports([r for r, _ in pipes], reports)
    finally:
        stop_processes(procs, 1.0)
        shutil.rmtree(rdv, ignore_errors=True)
        if os.path.isdir(SHM_DIR):  # the shared-memory files of ranks that exited before their peers read them
            sweep_stale(pids=[p.pid for p in procs if p.pid is not None])
    _raise_outcome(stop.signum, reports, failed, running)


def _raise_outcome(signum: Optional[int], reports: dict, failed: dict, running: set) -> None:
    if signum is not None and (failed or running):  # (a run that ended cleanly anyway stays completed)
        raise Interrupted(signum)
    errors = {r: rep for r, rep in reports.items() if rep["kind"] not in ("interrupted", "diverged")}
    diverged = [rep for rep in reports.values() if rep["kind"] == "diverged"]
    if diverged and not errors and not (set(failed) - set(reports)):
        raise Diverged(diverged[0].get("step"), diverged[0]["error"])
    if failed or errors:
        rank, message, link = _blame(errors, failed, running)
        raise RunFailed(rank, message, link)


def stop_processes(procs: list, grace_s: float) -> None:
    alive = [p for p in procs if p.pid is not None and p.is_alive()]
    for p in alive:
        p.terminate()
        try:
            os.kill(p.pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    for p in alive:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.kill()
            p.join(1.0)


def record_outcome(run_dir: Path, status: str, message: str, meta: Optional[dict] = None, **fields) -> dict:
    """Record how a run ended in summary.json, keeping what rank 0 wrote; when rank 0 wrote nothing
    readable, the steps come from metrics.jsonl. Raises OutputError when summary.json cannot be written."""
    path = run_dir / "summary.json"
    summary: dict = {}
    if path.is_file():
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            summary = {}
    if not isinstance(summary, dict) or not summary:
        rows = read_json_lines(run_dir / "metrics.jsonl")
        summary = {**(meta or {}), "steps_completed": len(rows), "last_step": rows[-1].get("step") if rows else None,
                   "tokens": sum(int(r.get("tokens", 0)) for r in rows), "run_dir": str(run_dir)}
    if status != "interrupted" or summary.get("status") != "interrupted":
        summary.update({"status": status, "error": message, **fields})
    atomic_write_json(path, summary)
    return summary


def mark_failed(run_dir: Path, rank: Optional[int], message: str, link: Optional[str] = None) -> None:
    """Record a failure in summary.json, keeping what rank 0 already wrote (never half-written)."""
    record_outcome(run_dir, "failed", message, failed_rank=rank, failed_link=link)

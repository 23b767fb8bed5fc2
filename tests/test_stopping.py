"""Stop when asked: SIGTERM or SIGINT to the launcher (or to torchrun) stops every rank within seconds,
leaves no process behind, and records the run as interrupted with the steps completed so far.

Real processes, a tiny 2-stage run with more steps than it will ever reach; each test signals it once
it has recorded a few steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lowbw.launch import free_port
from lowbw.testing.processes import (alive, descendants, listening_sockets, is_loopback, outputs_complete,
                                     start_train, stop_all, wait_for_steps)

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="watches processes through /proc (Linux)")

ENDLESS = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "pipeline.stages=2",
           "train.steps=1000000", "train.eval_batches=1", "progress=false", "net=ideal", "clock=virtual"]
STOP_WITHIN_S = 60  # a hang guard, not a speed test: scripts/fault_matrix.py measures how long it takes


def _interrupt(tmp_path, send, torchrun=None):
    """Start a run, wait for 3 steps, ``send(proc)``; return (exit code, stderr, processes left, summary)."""
    run_dir = tmp_path / "run"
    proc = start_train(ENDLESS + [f"out_dir={run_dir}"], tmp_path, torchrun)
    pids: set[int] = set()
    try:
        wait_for_steps(run_dir, 3, proc)
        pids = descendants(proc.pid)
        listening = listening_sockets(pids | {proc.pid})
        send(proc)
        _, err = proc.communicate(timeout=STOP_WITHIN_S)
        deadline = time.monotonic() + 10
        while alive(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = alive(pids)
    finally:
        stop_all(proc, pids)
    summary = json.loads((run_dir / "summary.json").read_text())
    return proc.returncode, err, left, summary, listening


def _check_interrupted(summary, run_dir, signame):
    assert summary["status"] == "interrupted" and signame in summary["error"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) >= 3 and summary["steps_completed"] == len(rows)
    assert summary["last_step"] == rows[-1]["step"] and summary["tokens"] == sum(r["tokens"] for r in rows)
    assert summary["train_loss"] == rows[-1]["loss"]  # the figures up to the last completed step
    assert outputs_complete(run_dir) == []


def test_sigterm_to_the_launcher_stops_every_rank_and_records_the_run_as_interrupted(tmp_path):
    code, err, left, summary, listening = _interrupt(tmp_path, lambda p: p.send_signal(signal.SIGTERM))
    assert code == 143 and left == set(), err[-2000:]
    _check_interrupted(summary, tmp_path / "run", "SIGTERM")
    assert "Traceback" not in err and "interrupted by SIGTERM" in err
    # self-spawned: a file store, gloo on loopback -- nothing listens beyond this machine
    assert listening and all(is_loopback(a) for a in listening), listening


def test_ctrl_c_to_the_process_group_stops_every_rank_with_exit_code_130(tmp_path):
    code, err, left, summary, _ = _interrupt(tmp_path, lambda p: os.killpg(p.pid, signal.SIGINT))
    assert code == 130 and left == set(), err[-2000:]
    _check_interrupted(summary, tmp_path / "run", "SIGINT")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_sigint_to_the_launcher_alone_stops_every_rank_with_exit_code_130(tmp_path):
    code, err, left, summary, _ = _interrupt(tmp_path, lambda p: p.send_signal(signal.SIGINT))
    assert code == 130 and left == set(), err[-2000:]
    _check_interrupted(summary, tmp_path / "run", "SIGINT")
    assert "Traceback" not in err and "interrupted by SIGINT" in err


def test_ranks_stop_by_themselves_when_the_launcher_is_killed(tmp_path):
    code, err, left, summary, _ = _interrupt(tmp_path, lambda p: p.send_signal(signal.SIGKILL))
    assert code == -signal.SIGKILL and left == set()
    _check_interrupted(summary, tmp_path / "run", "SIGTERM")  # each rank stopped itself with SIGTERM


def test_a_rank_whose_launcher_is_gone_reports_a_peer_failure_as_the_sigterm_it_was_about_to_get(monkeypatch):
    # the ranks poll for the launcher out of phase: the first to notice exits, and its peer's receive
    # fails before that peer's own poll; the peer must still record the run as interrupted
    from lowbw.errors import Interrupted, PeerError
    from lowbw.rank import launcher_watch

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    failure = PeerError(1, "rank 1 closed the connection", kind="dead")
    monkeypatch.setattr(launcher_watch, "_watch", launcher_watch.LauncherWatch(os.getpid()))
    assert launcher_watch.as_stop(failure) is failure  # launcher alive: the failure stands
    monkeypatch.setattr(launcher_watch, "_watch", launcher_watch.LauncherWatch(gone.pid))
    stop = launcher_watch.as_stop(failure)
    assert isinstance(stop, Interrupted) and stop.signum == signal.SIGTERM and stop.__cause__ is failure
    assert launcher_watch.as_stop(stop) is stop
    monkeypatch.setattr(launcher_watch, "_watch", None)  # under torchrun nothing is watched
    assert launcher_watch.as_stop(failure) is failure


def test_sigterm_to_torchrun_stops_every_rank_and_records_the_run_as_interrupted(tmp_path):
    torchrun = ["--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    code, err, left, summary, _ = _interrupt(tmp_path, lambda p: p.send_signal(signal.SIGTERM), torchrun)
    assert left == set(), err[-2000:]
    _check_interrupted(summary, tmp_path / "run", "SIGTERM")
    assert "lowbw: rank 0: interrupted by SIGTERM" in err and "lowbw: rank 1: interrupted by SIGTERM" in err

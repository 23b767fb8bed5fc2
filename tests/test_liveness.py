"""Heartbeats tell a dead process, a hung process, a slow one and a dead link apart, and name the rank.

The verdict logic is checked with several heartbeats in one process sharing an in-memory store (fast,
exact); the whole path -- a rank stopped with SIGSTOP, a link down on the wall clock -- with real
processes at the end.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import threading
import time

import pytest

from lowbw.errors import PeerError
from lowbw.launch import RunFailed
from lowbw.net.liveness import Heartbeat, LinkWatch, intervals
from lowbw.train import run

TIMEOUT = 1.0  # s: beats every 0.05 s, silence counts after 0.33 s


class MemoryStore:
    """The three c10d store calls a heartbeat makes, on a dict shared by the ranks of one test."""

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def set(self, key: str, value: str) -> None:
        with self.lock:
            self.data[key] = value.encode()

    def check(self, keys: list[str]) -> bool:
        with self.lock:
            return all(k in self.data for k in keys)

    def get(self, key: str) -> bytes:
        with self.lock:
            return self.data[key]


@pytest.fixture
def ranks():
    store = MemoryStore()
    beats = [Heartbeat(store, r, 4, TIMEOUT).start() for r in range(4)]
    yield beats
    for b in beats:
        b.stop()


def settle(seconds: float = 0.5) -> None:
    time.sleep(seconds)  # several beats: everyone has read everyone


class SlowStore(MemoryStore):
    """A store whose reads take a while (a loaded machine, a remote store), and which says when one is in progress."""

    def __init__(self):
        super().__init__()
        self.inside = threading.Event()

    def get(self, key: str) -> bytes:
        self.inside.set()
        time.sleep(0.3)
        return super().get(key)


def test_closing_a_heartbeat_waits_until_its_thread_is_out_of_the_store():
    # A daemon thread still inside a store call when the interpreter exits aborts the process: close() (the end
    # of a completed run) waits for it; stop() (a failed rank, which leaves with os._exit) does not.
    store = SlowStore()
    store.set("lowbw/live/1", json.dumps({"beat": 1}))  # a peer's record: the heartbeat reads it every beat
    beat = Heartbeat(store, 0, 2, TIMEOUT).start()
    assert store.inside.wait(5.0)
    beat.stop()
    assert beat._thread.is_alive()  # still in the store
    beat.close()
    assert not beat._thread.is_alive()


def test_beat_interval_and_staleness_scale_with_the_timeout():
    assert intervals(60.0) == (1.0, 10.0)
    assert intervals(6.0) == (0.3, 2.0)
    interval, stale = intervals(1.0)
    assert stale >= 5 * interval and stale < 1.0


def test_a_silent_peer_is_named_hung(ranks):
    settle()
    ranks[2].stop()  # its threads no longer run: SIGSTOP, a debugger
    settle(0.8)
    err = ranks[1].receive_timed_out(1, 2, (0, 3, 2, 0), TIMEOUT)
    assert isinstance(err, PeerError) and err.peer == 2 and err.kind == "hung"
    assert "rank 2 stopped answering" in str(err)


def test_a_rank_waiting_on_a_live_peer_blames_the_rank_that_peer_waits_for(ranks):
    ranks[1].waiting(2)  # rank 1 is alive and itself waits for rank 2
    settle()
    ranks[2].stop()
    settle(0.8)
    err = ranks[0].receive_timed_out(0, 1, (0, 3, 1, 0), TIMEOUT)
    assert (err.peer, err.kind) == (2, "hung")


def test_messages_handed_to_a_link_and_never_received_blame_the_link(ranks):
    ranks[1].sent(2)  # rank 1 handed a message for rank 2 to the link ...
    ranks[2].waiting(1)  # ... and rank 2 waits for it; both keep beating
    settle()
    err = ranks[2].receive_timed_out(2, 1, (0, 3, 2, 0), TIMEOUT)
    assert err.kind == "link" and err.link == "1->2" and err.peer == 1
    assert "link 1->2 delivered nothing" in str(err)
    ranks[2].arrived(1)  # once it arrives, the same wait is no longer the link's fault
    settle()
    assert ranks[2].receive_timed_out(2, 1, (0, 3, 2, 0), TIMEOUT).kind == "slow"


def test_a_live_peer_that_waits_for_nobody_and_sent_nothing_is_slow(ranks):
    settle()
    err = ranks[3].receive_timed_out(3, 2, (0, 3, 3, 0), TIMEOUT)
    assert (err.peer, err.kind) == (2, "slow") and "raise timeout_s" in str(err)


def test_a_broken_connection_is_a_dead_peer_when_its_heartbeat_stops_else_the_link(ranks):
    settle()
    assert ranks[0].link_failed(0, 1, ConnectionResetError("peer closed")).kind == "link"  # rank 1 still beats
    ranks[1].stop()
    err = ranks[0].link_failed(0, 1, ConnectionResetError("peer closed"))
    assert (err.peer, err.kind) == (1, "dead") and "rank 1 died" in str(err)


def test_without_heartbeats_the_plain_verdicts_remain():
    err = LinkWatch().receive_timed_out(0, 1, (0, 0, 1, 0), 60.0)
    assert err.peer == 1 and "has died or hangs" in str(err)


# ---- real processes ---------------------------------------------------------------------------------

TINY = ["model.n_embd=32", "model.n_head=2", "model.block_size=16", "progress=false", "train.eval_batches=1",
        "net=ideal", "clock=virtual", "train.steps=100000"]


def _stop_rank_when_running(run_dir, rank: int, after_steps: int, stopped: list) -> None:
    """Wait until the run has recorded ``after_steps`` steps, then SIGSTOP rank ``rank`` (spawned in order)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if len((run_dir / "metrics.jsonl").read_text().splitlines()) >= after_steps:
                break
        except OSError:
            pass
        time.sleep(0.2)
    pids = sorted(p.pid for p in mp.active_children() if p.name.startswith("lowbw-rank"))
    os.kill(pids[rank], signal.SIGSTOP)
    stopped.append((pids[rank], time.monotonic()))


def test_a_stopped_rank_is_named_as_the_one_that_stopped_answering(compose, tmp_path):
    cfg = compose(TINY + ["model.n_layer=3", "pipeline.stages=3", "timeout_s=6"])
    stopped: list = []
    watcher = threading.Thread(target=_stop_rank_when_running, args=(tmp_path, 1, 3, stopped))
    watcher.start()
    with pytest.raises(RunFailed) as info:
        run(cfg, tmp_path)
    watcher.join()
    assert info.value.rank == 1, str(info.value)
    assert "rank 1 stopped answering" in str(info.value) and "still running (it hangs)" in str(info.value)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_rank"] == 1
    assert mp.active_children() == []


def test_a_link_down_longer_than_the_timeout_is_blamed_on_the_link_not_a_rank(compose, tmp_path):
    # wall clock: rank 0's messages to rank 1 wait out an outage from 1 s to 60 s of the run
    cfg = compose(["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "progress=false",
                   "train.eval_batches=1", "net=ideal", "clock=wall", "train.steps=100000", "pipeline.stages=2",
                   "timeout_s=5", "faults.outages=[{link: '0->1', start_s: 1.0, end_s: 60.0}]"])
    with pytest.raises(RunFailed) as info:
        run(cfg, tmp_path)
    assert info.value.link == "0->1" and info.value.rank is None, str(info.value)
    assert "the link 0->1 delivered nothing" in str(info.value)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed_link"] == "0->1" and summary["failed_rank"] is None
    assert any("lasts 59 s on the wall clock" in w for w in summary["warnings"])

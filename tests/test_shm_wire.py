"""The shared-memory wire (lowbw.net.shm): gloo's matching rule over rings in /dev/shm, rings that grow
instead of blocking, failures named like gloo's, files that do not outlive their run.

Most tests put both ends in this process (two wires, one pid); one runs two processes over gloo to
pin which pairs the wire agrees on and that everything else still travels on gloo.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import uuid
from datetime import timedelta

import numpy as np
import pytest
import torch

from lowbw.net import shm
from lowbw.net.clock import WallClock
from lowbw.net.shm import PREFIX, SHM_DIR, ShmWire, sweep_stale
from lowbw.net.transport import CH_BWD, CH_FWD, PIPELINE_TAGS, Transport
from lowbw.net.wire import MemoryWire, Switchboard

pytestmark = pytest.mark.skipif(shm.supported() is not None, reason=f"no shared-memory wire here: {shm.supported()}")

T = timedelta(seconds=5)
TAGS = (4, 5)


def wires(pid: int | None = None, tags=TAGS):
    """Ranks 0 and 1 of one run in this process; rank 1 believes rank 0 is process ``pid``."""
    board, token = Switchboard(), uuid.uuid4().hex[:12]
    w0 = ShmWire(MemoryWire(board, 0), 0, token, {1: os.getpid()}, tags)
    w1 = ShmWire(MemoryWire(board, 1), 1, token, {0: pid or os.getpid()}, tags)
    return w0, w1, token


def recv(w: ShmWire, n: int, src: int, tag: int, timeout=T) -> torch.Tensor:
    buf = torch.empty(n, dtype=torch.uint8)
    w.irecv(buf, src, tag).wait(timeout)
    return buf


def lane_files(token: str) -> list[str]:
    return [f for f in os.listdir(SHM_DIR) if f.startswith(PREFIX) and token in f]


def test_messages_arrive_whole_and_in_order_per_tag_through_wraps_and_growth():
    w0, w1, token = wires()
    rng = np.random.default_rng(0)
    sent: dict[int, list[torch.Tensor]] = {t: [] for t in TAGS}
    taken = {t: 0 for t in TAGS}
    for _ in range(200):
        for _ in range(int(rng.integers(0, 4))):  # up to 3 sends, sizes 0..300 kB (the first ring is 1 MiB)
            t, n = int(rng.choice(TAGS)), int(rng.integers(0, 300_000))
            x = torch.from_numpy(rng.integers(0, 256, n, dtype=np.uint8))
            sent[t].append(x)
            w0.isend(x, 1, t).wait(T)  # complete at once: the ring grows rather than wait for the reader
        for t in TAGS:
            if taken[t] < len(sent[t]) and rng.random() < 0.45:  # the reader falls behind: rings fill and grow
                assert torch.equal(recv(w1, sent[t][taken[t]].numel(), 0, t), sent[t][taken[t]])
                taken[t] += 1
    for t in TAGS:
        for x in sent[t][taken[t]:]:
            assert torch.equal(recv(w1, x.numel(), 0, t), x)
    assert w0._out[1].gen > 0  # it did grow
    assert lane_files(token) == []  # each file unlinked once its reader mapped it


def test_a_message_sent_before_its_receive_is_posted_is_taken_by_that_receive():
    w0, w1, _ = wires()
    w0.isend(torch.full((10,), 7, dtype=torch.uint8), 1, 4)
    w0.isend(torch.full((3,), 9, dtype=torch.uint8), 1, 5)
    w1.poll()  # both records are read and kept aside: nothing was posted for them
    assert recv(w1, 3, 0, 5).tolist() == [9] * 3
    assert recv(w1, 10, 0, 4).tolist() == [7] * 10


def test_a_receive_of_the_wrong_size_fails_naming_both_sizes():
    w0, w1, _ = wires()
    w0.isend(torch.zeros(100, dtype=torch.uint8), 1, 4)
    with pytest.raises(RuntimeError, match="message of 100 bytes from rank 0 met a receive of 64 bytes on rank 1"):
        recv(w1, 64, 0, 4)


def test_a_dead_peer_fails_the_wait_at_once_naming_its_rank():
    gone = subprocess.Popen(["true"])
    gone.wait()
    _, w1, _ = wires(pid=gone.pid)
    with pytest.raises(RuntimeError, match=r"Connection closed by peer rank 0 \(its process \d+ is gone\)"):
        recv(w1, 8, 0, 4, timeout=timedelta(seconds=30))


def test_a_silent_live_peer_times_out_naming_its_rank():
    _, w1, _ = wires()
    with pytest.raises(RuntimeError, match="Timed out waiting 0 s for an operation with rank 0"):
        recv(w1, 8, 0, 4, timeout=timedelta(seconds=0.2))


@pytest.mark.skipif(not os.path.exists("/proc/self/timerslack_ns"), reason="no timer slack to read here")
def test_the_thread_that_makes_a_wire_sleeps_with_a_tight_timer_slack():
    def slack() -> int:
        with open(f"/proc/{threading.get_native_id()}/timerslack_ns") as f:  # this thread's
            return int(f.read())

    seen = {}

    def make():  # in a thread of its own: the setting is per thread, inherited from the thread that starts it
        ctypes.CDLL(None).prctl(29, 50_000, 0, 0, 0)  # PR_SET_TIMERSLACK: Linux's default, whatever ran before
        seen["before"] = slack()
        wires()
        seen["after"] = slack()

    t = threading.Thread(target=make)
    t.start()
    t.join()
    assert seen == {"before": 50_000, "after": shm.TIMER_SLACK_NS}


def test_other_tags_and_peers_travel_on_the_wrapped_wire():
    board, token = Switchboard(), uuid.uuid4().hex[:12]
    plain = {r: MemoryWire(board, r) for r in (0, 1, 2)}
    w0 = ShmWire(plain[0], 0, token, {1: os.getpid()}, TAGS)  # rank 2 is on another host
    w0.isend(torch.full((4,), 1, dtype=torch.uint8), 1, 6)  # not a shared-memory tag
    w0.isend(torch.full((4,), 2, dtype=torch.uint8), 2, 4)  # not a shared-memory peer
    a, b = torch.empty(4, dtype=torch.uint8), torch.empty(4, dtype=torch.uint8)
    plain[1].irecv(a, 0, 6).wait(T)
    plain[2].irecv(b, 0, 4).wait(T)
    assert a.tolist() == [1] * 4 and b.tolist() == [2] * 4
    assert lane_files(token) == []  # neither made a ring


def test_old_files_of_exited_processes_are_swept_and_those_of_live_or_recent_ones_kept(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    old, live, recent = (f"{PREFIX}{gone.pid}-tok-0to1-g0", f"{PREFIX}{os.getpid()}-tok-0to1-g0",
                         f"{PREFIX}{gone.pid}-tok-1to0-g0")
    for name in (old, live, recent, "other-file"):
        (tmp_path / name).write_bytes(b"x")
    os.utime(tmp_path / old, (0, 0))
    os.utime(tmp_path / live, (0, 0))
    assert sweep_stale(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == sorted([live, recent, "other-file"])
    assert sweep_stale(str(tmp_path), pids=[gone.pid]) == 1  # a launcher's own ranks: whatever their age
    assert sorted(os.listdir(tmp_path)) == sorted([live, "other-file"])


def test_a_transport_over_shared_memory_moves_sized_and_unsized_messages():
    w0, w1, _ = wires(tags=PIPELINE_TAGS)
    a, b = [Transport(r, None, WallClock(torch.device("cpu")), 5.0, w) for r, w in ((0, w0), (1, w1))]
    b.expect(0, CH_FWD, (0, 0, 1, 0), 1000)
    b.expect(0, CH_BWD, (0, 0, 1, 1), None)
    a.send(1, CH_BWD, (0, 0, 1, 1), torch.full((37,), 3, dtype=torch.uint8), sized=False)
    a.send(1, CH_FWD, (0, 0, 1, 0), torch.full((1000,), 5, dtype=torch.uint8))
    b.progress()
    assert b.recv(0, CH_FWD, (0, 0, 1, 0)).payload.tolist() == [5] * 1000
    assert b.recv(0, CH_BWD, (0, 0, 1, 1)).payload.tolist() == [3] * 37
    a.close()
    b.close()


def _connected_pair(rank: int, port: int, q) -> None:
    import torch.distributed as dist

    from lowbw.net.transport import CONTROL_TAGS
    from lowbw.net.wire import GLOO_TIMEOUT, GlooWire

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        wire = ShmWire.connect(GlooWire.per_direction(rank, 2, GLOO_TIMEOUT, CONTROL_TAGS), rank, 2, PIPELINE_TAGS)
        tr = Transport(rank, None, WallClock(torch.device("cpu")), 30.0, wire)
        other = 1 - rank
        tr.expect(other, CH_FWD, (0, 0, 0, 0), 50_000)
        tr.send(other, CH_FWD, (0, 0, 0, 0), torch.full((50_000,), rank + 1, dtype=torch.uint8))
        got = tr.recv(other, CH_FWD, (0, 0, 0, 0)).payload
        if rank == 1:
            tr.send_json(0, (9, 0, 1, 0), {"from": rank})  # control: over gloo
        report = tr.recv_json(1, (9, 0, 1, 0)) if rank == 0 else None
        tr.close()
        q.put((rank, sorted(wire.peers), int(got[0]), int(got.sum()), report))
        dist.barrier()
    except BaseException as e:  # noqa: BLE001 -- reported to the test
        q.put((rank, repr(e)))
    dist.destroy_process_group()


def test_two_processes_of_one_host_agree_to_share_memory_and_keep_control_on_gloo():
    from lowbw.testing.spawn import pair_results

    items, codes = pair_results(_connected_pair, 2)
    results = sorted(items)
    assert results[0] == (0, [1], 2, 2 * 50_000, {"from": 1}), results
    assert results[1] == (1, [0], 1, 50_000, None), results
    assert codes == [0, 0]

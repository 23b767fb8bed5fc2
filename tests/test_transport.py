"""The transport: keyed messages posted early, both framings, failures naming the peer, emulated delivery.

Most tests run two transports in one process over lowbw.net.wire.MemoryWire (gloo's matching rule,
stricter about sizes); one runs two processes over gloo to pin the fix for gloo's silent cancel of
sends whose handle is dropped.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from datetime import timedelta

import pytest
import torch

from lowbw.errors import PeerError
from lowbw.net.clock import VirtualClock, WallClock
from lowbw.net.link import LinkModel
from lowbw.net.liveness import LinkWatch
from lowbw.net.topology import PairLink, Topology
from lowbw.net.transport import _HOST, CH_BWD, CH_FWD, CONTROL_TAGS, Message, Transport, tag
from lowbw.net.wire import GlooWire, MemoryWire, Switchboard

CPU = torch.device("cpu")


def pair(timeout_s: float = 5.0, clock=VirtualClock, links=None):
    board = Switchboard()
    return board, [Transport(r, links[r] if links else None, clock(CPU), timeout_s, MemoryWire(board, r))
                   for r in range(2)]


def payload(n: int, fill: int) -> torch.Tensor:
    return torch.full((n,), fill, dtype=torch.uint8)


def test_messages_are_taken_by_key_in_any_order_once_posted_in_the_senders_order():
    _, (a, b) = pair()
    keys = [(0, 0, 1, i) for i in range(4)]
    for i, k in enumerate(keys):  # b expects what a will send, in a's order: sized, and one unsized
        b.expect(0, CH_FWD, k, None if i == 2 else 100 + i)
    b.expect(0, CH_BWD, (0, 0, 1, 9), 7)
    for i, k in enumerate(keys):
        a.send(1, CH_FWD, k, payload(100 + i, i), sized=i != 2)
    a.send(1, CH_BWD, (0, 0, 1, 9), payload(7, 9))
    for i in (3, 1, 2, 0):  # taken in another order than sent
        msg = b.recv(0, CH_FWD, keys[i])
        assert msg.key == keys[i] and msg.nbytes == 100 + i and bool((msg.payload == i).all())
    assert bool((b.recv(0, CH_BWD, (0, 0, 1, 9)).payload == 9).all())
    a.close()
    b.close()


def test_unsized_payloads_are_posted_between_actions_as_their_headers_come_in():
    _, (a, b) = pair()
    b.expect(0, CH_FWD, (0, 0, 1, 0), None)
    b.expect(0, CH_FWD, (0, 0, 1, 1), None)
    a.send(1, CH_FWD, (0, 0, 1, 0), payload(33, 1), sized=False)
    a.send(1, CH_FWD, (0, 0, 1, 1), payload(0, 0), sized=False)  # an empty payload: header only
    b.progress()
    assert not b._unsized[(0, CH_FWD)]  # both headers were in: both payload receives are posted
    assert b.recv(0, CH_FWD, (0, 0, 1, 1)).nbytes == 0
    assert b.recv(0, CH_FWD, (0, 0, 1, 0)).nbytes == 33


def test_a_message_the_receiver_never_expected_is_named():
    _, (a, b) = pair()
    with pytest.raises(RuntimeError, match=r"message \(0, 0, 1, 5\) from rank 0 was never expected"):
        b.recv(0, CH_FWD, (0, 0, 1, 5))


def test_two_ranks_disagreeing_on_message_order_is_an_error_not_a_wrong_tensor():
    _, (a, b) = pair()
    b.expect(0, CH_FWD, (0, 0, 1, 0), 8)
    b.expect(0, CH_FWD, (0, 0, 1, 1), 8)
    a.send(1, CH_FWD, (0, 0, 1, 1), payload(8, 1))  # sent in the other order, same sizes
    a.send(1, CH_FWD, (0, 0, 1, 0), payload(8, 0))
    with pytest.raises(RuntimeError, match="disagree on the order"):
        b.recv(0, CH_FWD, (0, 0, 1, 0))


def test_a_silent_peer_becomes_a_peer_error_after_the_timeout():
    _, (a, b) = pair(timeout_s=0.3)
    b.expect(0, CH_FWD, (0, 0, 1, 0), 8)
    t0 = time.monotonic()
    with pytest.raises(PeerError, match="no message from rank 0 for 0.3 s") as info:
        b.recv(0, CH_FWD, (0, 0, 1, 0))
    assert info.value.peer == 0 and time.monotonic() - t0 >= 0.29


def test_a_dead_peer_is_named_at_once():
    board, (a, b) = pair(timeout_s=30.0)
    b.expect(0, CH_FWD, (0, 0, 1, 0), 8)
    threading.Timer(0.1, board.fail, args=(0, "crashed")).start()
    t0 = time.monotonic()
    with pytest.raises(PeerError, match="link to rank 0 failed") as info:
        b.recv(0, CH_FWD, (0, 0, 1, 0))
    assert info.value.peer == 0 and time.monotonic() - t0 < 5


def test_close_names_messages_expected_but_never_taken():
    _, (a, b) = pair()
    b.expect(0, CH_FWD, (0, 0, 1, 0), 8)
    a.send(1, CH_FWD, (0, 0, 1, 0), payload(8, 0))
    with pytest.raises(RuntimeError, match=r"never taken: \(0, CH, \(0, 0, 1, 0\)\)".replace("CH", str(CH_FWD))):
        b.close()


def test_reports_that_come_early_wait_for_their_turn():
    _, (a, b) = pair()
    for step in range(3):
        a.send_json(1, (2, step, 0, 0), {"step": step})
    assert b.recv_json(0, (2, 2, 0, 0)) == {"step": 2}
    assert b.recv_json(0, (2, 0, 0, 0)) == {"step": 0}
    assert b.recv_json(0, (2, 1, 0, 0)) == {"step": 1}
    a.close()


def test_virtual_delivery_is_the_senders_arrival_charged_to_the_receivers_downlink():
    topo = Topology(2, "pipelined", (8e6, 8e6), (8e6, 8e6), {(0, 1): PairLink(0.05, 0.0, 8e6),
                                                              (1, 0): PairLink(0.05, 0.0, 8e6)})
    links = [LinkModel(topo, r) for r in range(2)]
    _, (a, b) = pair(links=links)
    b.expect(0, CH_FWD, (0, 0, 1, 0), 1000)
    arrival = a.send(1, CH_FWD, (0, 0, 1, 0), payload(1000, 0))
    assert arrival == pytest.approx(1000 * 8 / 8e6 + 0.05)
    msg = b.recv(0, CH_FWD, (0, 0, 1, 0))
    assert b.delivery_time(msg) == pytest.approx(arrival)


@pytest.mark.parametrize("same_host", [True, False])
def test_wall_latency_counts_from_the_senders_release_on_one_host_and_from_arrival_plus_hold_across(same_host):
    topo = Topology(2, "pipelined", (1e12, 1e12), (1e12, 1e12), {(0, 1): PairLink(0.030, 0.0, 1e12),
                                                                  (1, 0): PairLink(0.030, 0.0, 1e12)})
    clock = WallClock(CPU)
    tr = Transport(1, LinkModel(topo, 1), clock, 5.0, MemoryWire(Switchboard(), 1))
    now = time.perf_counter()
    msg = Message(0, CH_FWD, (0, 0, 1, 0), payload(0, 0), 0.0, received_wall=now - 0.010,
                  sent_host=_HOST if same_host else _HOST + 1, sent_wall=now - 0.004, hold=0.020)
    t = clock.now()
    left_ago = 0.004 if same_host else 0.010 - 0.020  # seconds before now that latency starts counting
    assert tr.delivery_time(msg) == pytest.approx(t - left_ago + 0.030, abs=2e-3)


# ---- the liveness hook and a regime's charge ----------------------------------------------------


class Recording(LinkWatch):
    def __init__(self):
        self.events: list[tuple] = []

    def sent(self, dst):
        self.events.append(("sent", dst))

    def arrived(self, src):
        self.events.append(("arrived", src))

    def waiting(self, src):
        self.events.append(("waiting", src))


def slow_topology(bps: float) -> Topology:
    pair_link = PairLink(0.0, 0.0, bps)
    return Topology(2, "pipelined", (bps, bps), (bps, bps), {(0, 1): pair_link, (1, 0): pair_link})


def test_the_liveness_hook_hears_of_every_send_every_arrival_and_every_wait():
    board, watches = Switchboard(), [Recording(), Recording()]
    a, b = [Transport(r, None, VirtualClock(CPU), 5.0, MemoryWire(board, r), watch=watches[r]) for r in range(2)]
    b.expect(0, CH_FWD, (0, 0, 1, 0), 8)
    b.expect(0, CH_BWD, (0, 0, 1, 0), None)
    a.send(1, CH_FWD, (0, 0, 1, 0), payload(8, 1))
    a.send(1, CH_BWD, (0, 0, 1, 0), payload(5, 2), sized=False)
    a.send_json(1, (2, 0, 0, 0), {"step": 0})
    b.recv(0, CH_FWD, (0, 0, 1, 0))
    b.recv(0, CH_BWD, (0, 0, 1, 0))
    b.recv_json(0, (2, 0, 0, 0))
    assert watches[0].events == [("sent", 1)] * 3
    assert watches[1].events.count(("arrived", 0)) == 3
    assert watches[1].events[-3:] == [("waiting", 0), ("arrived", 0), ("waiting", None)]  # the report
    assert ("waiting", 0) in watches[1].events[:-3]  # a pipeline receive says whom it waits for


def test_a_regime_charges_the_link_its_target_bytes_on_the_channels_it_names():
    topo = slow_topology(8_000.0)  # 1000 bytes/s: arrival in seconds = bytes / 1000
    board = Switchboard()
    a, b = [Transport(r, LinkModel(topo, r), VirtualClock(CPU), 5.0, MemoryWire(board, r), charge={CH_FWD: (3, 1)})
            for r in range(2)]
    assert a.charged_bytes(CH_FWD, 100) == 300 and a.charged_bytes(CH_BWD, 100) == 100
    b.expect(0, CH_FWD, (0, 0, 1, 0), 100)
    arrival = a.send(1, CH_FWD, (0, 0, 1, 0), payload(100, 0))
    assert arrival == pytest.approx(0.3, rel=0.05)  # 300 bytes charged, 100 moved
    msg = b.recv(0, CH_FWD, (0, 0, 1, 0))
    assert msg.nbytes == 100 and b.delivery_time(msg) >= arrival


def test_on_the_wall_clock_a_message_its_uplink_holds_past_the_timeout_is_a_timeout_and_not_an_arrival():
    topo = slow_topology(80.0)  # 10 bytes/s: 1000 bytes leave the emulated uplink after 100 s
    board, watch = Switchboard(), Recording()
    a = Transport(0, LinkModel(topo, 0), WallClock(CPU), 0.3, MemoryWire(board, 0))
    b = Transport(1, LinkModel(topo, 1), WallClock(CPU), 0.3, MemoryWire(board, 1), watch=watch)
    b.expect(0, CH_FWD, (0, 0, 1, 0), 1000)
    a.send(1, CH_FWD, (0, 0, 1, 0), payload(1000, 0))
    t0 = time.monotonic()
    msg = b.recv(0, CH_FWD, (0, 0, 1, 0))  # in at once: the bytes moved in memory
    with pytest.raises(PeerError, match="no message from rank 0 for 0.3 s") as info:
        b.delivery_time(msg)
    assert info.value.peer == 0 and 0.29 <= time.monotonic() - t0 < 5
    assert ("arrived", 0) not in watch.events  # the heartbeat counts it in flight: the link is blamed


# ---- gloo: a send whose handle is dropped is cancelled; the transport keeps them -------------------


def _gloo_pair(rank: int, port: int, q) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    tr = Transport(rank, None, WallClock(CPU), 30.0)
    try:
        if rank == 0:
            for i in range(3):
                tr.send(1, CH_FWD, (0, 0, 1, i), payload(100_000, i))
            gc.collect()  # nothing of the sends is referenced outside the transport
            dist.barrier()  # only now does rank 1 post its receives
        else:
            dist.barrier()
            for i in range(3):
                tr.expect(0, CH_FWD, (0, 0, 1, i), 100_000)
            q.put([int(tr.recv(0, CH_FWD, (0, 0, 1, i)).payload[0]) for i in range(3)])
        tr.close()
    except BaseException as e:  # noqa: BLE001 -- reported to the test
        q.put(repr(e))
    dist.destroy_process_group()


def test_sends_posted_before_their_receives_arrive_although_nothing_else_holds_them():
    from lowbw.testing.spawn import pair_results

    (got,), codes = pair_results(_gloo_pair, 1)
    assert got == [0, 1, 2]
    assert codes == [0, 0]


def test_each_direction_between_two_ranks_has_its_own_process_group_and_control_keeps_the_default():
    upward, downward, default = object(), object(), object()
    wires = {r: GlooWire(default, r, upward, downward, CONTROL_TAGS) for r in (0, 1, 2)}
    fwd = tag(CH_FWD, 0)
    assert wires[0].group_for(0, 2, fwd) is upward and wires[2].group_for(0, 2, fwd) is upward
    assert wires[2].group_for(2, 0, fwd) is downward and wires[0].group_for(2, 0, tag(CH_BWD, 2)) is downward
    assert all(wires[1].group_for(1, 0, t) is default for t in CONTROL_TAGS)
    assert GlooWire(default).group_for(1, 0, fwd) is default  # no direction groups: one group for all

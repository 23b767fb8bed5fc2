"""The link model: delivery times by the formula, FIFO under jitter, real delays in wall time."""

import math
import os
import time
from datetime import timedelta

import pytest
import torch

from lowbw.config import NetConfig, PairConfig, RandomLinksConfig
from lowbw.errors import ConfigError
from lowbw.net.link import LinkModel
from lowbw.net.topology import Topology


def topo(n=2, **kw):
    return Topology.from_config(NetConfig(**kw), n)


def test_virtual_delivery_equals_formula_pipelined():
    # 20 Mbit/s up, 100 down, 30 ms: three 1 MB messages handed over at t=0, 0.1 and 2.0
    t = topo(latency_ms=30.0, uplink_mbps=20.0, downlink_mbps=100.0)
    sender, receiver = LinkModel(t, 0), LinkModel(t, 1)
    b, bw, lat = 1_000_000, 20e6, 0.030
    free, got = 0.0, []
    for t_send in (0.0, 0.1, 2.0):
        start = max(t_send, free)
        free = start + 8 * b / bw
        timing = sender.send(1, b, t_send)
        assert timing.start == start and timing.tx_done == free
        got.append(receiver.deliver(0, b, timing.arrival))
        assert got[-1] == free + lat  # docs/architecture.md: delivery = uplink_free + latency, exactly
    assert got == [0.4 + lat, 0.8 + lat, 2.4 + lat]


def test_serialized_semantics_holds_the_wire_for_latency_too():
    t = topo(latency_ms=30.0, uplink_mbps=20.0, downlink_mbps=100.0, semantics="serialized")
    s = LinkModel(t, 0)
    a1 = s.send(1, 1_000_000, 0.0).arrival
    a2 = s.send(1, 1_000_000, 0.0).arrival
    assert a1 == pytest.approx(0.43) and a2 == pytest.approx(0.86)


def test_bandwidth_is_min_of_sender_uplink_and_receiver_downlink():
    t = topo(uplink_mbps=100.0, downlink_mbps=10.0, latency_ms=0.0)
    assert LinkModel(t, 0).send(1, 125_000, 0.0).arrival == pytest.approx(0.1)  # 1 Mbit at 10 Mbit/s


def test_receiver_downlink_is_shared_between_senders():
    # two senders at full downlink speed each: the second message waits for the first
    t = topo(n=3, uplink_mbps=10.0, downlink_mbps=10.0, latency_ms=5.0)
    r = LinkModel(t, 2)
    a0 = LinkModel(t, 0).send(2, 125_000, 0.0).arrival
    a1 = LinkModel(t, 1).send(2, 125_000, 0.0).arrival
    assert a0 == a1 == pytest.approx(0.105)
    assert r.deliver(0, 125_000, a0) == pytest.approx(0.105)
    assert r.deliver(1, 125_000, a1) == pytest.approx(0.205)


def test_jitter_delays_messages_but_never_reorders_them():
    t = topo(latency_ms=10.0, jitter_ms=20.0, uplink_mbps=1000.0, downlink_mbps=1000.0)
    s = LinkModel(t, 0, seed=3)
    arrivals = [s.send(1, 1000, i * 0.001).arrival for i in range(500)]
    base = [i * 0.001 + 8e3 / 1e9 + 0.010 for i in range(500)]
    assert all(b2 >= b1 for b1, b2 in zip(arrivals, arrivals[1:]))  # FIFO
    assert sum(a - b for a, b in zip(arrivals, base)) / 500 > 0.010  # jitter is really there
    again = LinkModel(t, 0, seed=3)
    assert [again.send(1, 1000, i * 0.001).arrival for i in range(500)] == arrivals  # seeded


def test_region_pairs_and_random_links_resolve_per_directed_pair():
    t = topo(n=4, regions=["a", "b"], pairs={"a-b": PairConfig(latency_ms=40.0, bandwidth_mbps=5.0)},
             uplink_mbps=100.0, downlink_mbps=100.0, latency_ms=1.0)
    assert t.link(0, 1).latency_s == pytest.approx(0.040) and t.link(1, 0).bandwidth_bps == 5e6
    assert t.link(0, 2).latency_s == pytest.approx(0.001)  # same region: defaults
    r1 = topo(n=4, random=RandomLinksConfig(seed=1))
    r2 = topo(n=4, random=RandomLinksConfig(seed=1))
    assert r1.pairs == r2.pairs and len({p.bandwidth_bps for p in r1.pairs.values()}) == 12


@pytest.mark.parametrize("field,value", [("uplink_mbps", 0.0), ("downlink_mbps", -5.0), ("latency_ms", -1.0),
                                         ("jitter_ms", math.nan)])
def test_bad_link_numbers_are_config_errors_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        topo(**{field: value})



# ---- line rate: TCP/IP headers and Ethernet framing per segment (net.framing=line) -----------------


def test_payload_framing_charges_eight_bits_a_payload_byte():
    assert topo().framing.wire_bytes(1_000_000) == 1_000_000


def test_line_framing_charges_78_bytes_for_each_segment_of_1460():
    # per segment: IPv4 20 + TCP 20 (no options) + preamble/SFD 8 + MAC header 14 + FCS 4 + inter-frame gap 12
    f = topo(framing="line").framing
    assert f.per_segment_bytes == 78
    assert [f.wire_bytes(b) for b in (0, 1, 1460, 1461, 1_000_000)] == [0, 79, 1538, 1617, 1_000_000 + 685 * 78]
    assert topo(framing="line", mss_bytes=1448, tcp_ip_header_bytes=52).framing.wire_bytes(1448) == 1448 + 90


def test_line_framing_gives_the_textbook_tcp_goodput_of_gigabit_ethernet():
    # full segments only: 1460 payload bytes in 1538 bytes of line time, 949.3 Mbit/s of goodput on 1 Gbit/s
    t = topo(framing="line", uplink_mbps=1000.0, downlink_mbps=1000.0, latency_ms=0.0)
    b = 1460 * 100_000
    seconds = LinkModel(t, 0).send(1, b, 0.0).arrival
    assert seconds == pytest.approx(8 * 1538 * 100_000 / 1e9, rel=1e-12)
    assert 8 * b / seconds / 1e6 == pytest.approx(949.284, abs=1e-3)
    assert LinkModel(t, 1).deliver(0, b, seconds) == seconds  # the downlink is charged the same line bytes


def test_a_message_sent_both_ways_at_once_takes_tx_over_the_duplex_efficiency():
    # 1 MB each way at t=0 over 20 Mbit/s, 30 ms: tx = 0.4 s alone, 0.4 / 0.8 = 0.5 s while both directions send
    t = topo(latency_ms=30.0, uplink_mbps=20.0, downlink_mbps=20.0, duplex_efficiency=0.8)
    a, b = LinkModel(t, 0), LinkModel(t, 1)
    to_b, to_a = a.send(1, 1_000_000, 0.0), b.send(0, 1_000_000, 0.0)
    assert b.deliver(0, 1_000_000, to_b.arrival) == pytest.approx(0.5 + 0.030, rel=1e-12)
    assert a.deliver(1, 1_000_000, to_a.arrival) == pytest.approx(0.5 + 0.030, rel=1e-12)


def test_only_the_overlapped_part_of_a_message_is_stretched_and_one_way_traffic_not_at_all():
    t = topo(latency_ms=0.0, uplink_mbps=20.0, downlink_mbps=20.0, duplex_efficiency=0.5)
    a, b = LinkModel(t, 0), LinkModel(t, 1)
    b.send(0, 500_000, 0.0)  # b sends to a over [0, 0.2]
    to_b = a.send(1, 1_000_000, 0.0)  # a sends to b over [0, 0.4]: 0.2 s of it overlap
    assert b.deliver(0, 1_000_000, to_b.arrival) == pytest.approx(0.4 + 0.2 * (1 / 0.5 - 1), rel=1e-12)
    alone = LinkModel(t, 1)
    assert alone.deliver(0, 1_000_000, LinkModel(t, 0).send(1, 1_000_000, 0.0).arrival) == pytest.approx(0.4)


def test_the_duplex_memory_survives_a_checkpoint():
    t = topo(latency_ms=0.0, uplink_mbps=20.0, downlink_mbps=20.0, duplex_efficiency=0.5)
    b = LinkModel(t, 1)
    b.send(0, 500_000, 0.0)
    restored = LinkModel(t, 1)
    restored.load_state_dict(b.state_dict())
    arrival = LinkModel(t, 0).send(1, 1_000_000, 0.0).arrival
    assert restored.deliver(0, 1_000_000, arrival) == b.deliver(0, 1_000_000, arrival) == pytest.approx(0.6)


@pytest.mark.parametrize("value", [0.0, 1.5, -0.2])
def test_a_duplex_efficiency_outside_0_1_is_refused(value):
    with pytest.raises(ConfigError, match="net.duplex_efficiency"):
        topo(duplex_efficiency=value)


@pytest.mark.parametrize("field, value, match", [
    ("framing", "ethernet", "net.framing='ethernet'"),
    ("mss_bytes", 0, "net.mss_bytes=0"),
    ("tcp_ip_header_bytes", -1, "net.tcp_ip_header_bytes=-1"),
])
def test_bad_framing_settings_are_config_errors_naming_the_field(field, value, match):
    kw = {"framing": "line", field: value}
    with pytest.raises(ConfigError, match=match.replace("(", r"\(")):
        topo(**kw)

# ---- wall clock over a real transport -------------------------------------------------------

def _wall_pair(rank, port, q):
    import torch.distributed as dist

    from lowbw.net.clock import WallClock
    from lowbw.net.transport import CH_FWD, Transport

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    t = topo(latency_ms=30.0, uplink_mbps=20.0, downlink_mbps=100.0)
    clock = WallClock(torch.device("cpu"))
    tr = Transport(rank, LinkModel(t, rank), clock, 60.0)
    if rank == 1:
        tr.expect(0, CH_FWD, (0, 0, 1, 0), 1_000_000)
    dist.barrier()
    if rank == 0:
        q.put(time.perf_counter())
        tr.send(1, CH_FWD, (0, 0, 1, 0), torch.zeros(1_000_000, dtype=torch.uint8))
    else:
        msg = tr.recv(0, CH_FWD, (0, 0, 1, 0))
        clock.wait_until(tr.delivery_time(msg))
        q.put(("delivered", time.perf_counter(), msg.nbytes))
    tr.close()
    dist.destroy_process_group()


def test_wall_clock_delivery_of_1MB_over_20Mbps_30ms_within_5_percent():
    from lowbw.testing.spawn import pair_results

    items, codes = pair_results(_wall_pair, 2)
    assert codes == [0, 0]
    sent = next(i for i in items if isinstance(i, float))
    _, delivered, nbytes = next(i for i in items if isinstance(i, tuple))
    expected = 8 * nbytes / 20e6 + 0.030  # 0.43 s
    assert abs((delivered - sent) - expected) / expected < 0.05, (delivered - sent, expected)

"""The link model: when does a message of b bytes, handed to the link at time t, arrive?

Sender side (one queue per sender uplink, shared by all its destinations)::

    start       = max(t, uplink_free)
    tx          = 8 w(b) / B_ij                      (B_ij = min(uplink_i, downlink_j, pair cap))
    pipelined:  uplink_free = start + tx;            arrival = uplink_free + latency_ij + jitter
    serialized: uplink_free = start + tx + latency;  arrival = uplink_free + jitter

FIFO per pair: arrival = max(arrival, previous arrival on the pair) -- jitter never reorders, as TCP.

Receiver side, in the order the receiver consumes messages (deterministic)::

    delivery      = max(arrival, downlink_free + 8 w(b) / downlink_j)
    downlink_free = delivery

``w(b)`` is what the message occupies on the wire (``Topology.framing``): its payload ``b`` by
default; with ``net.framing=line`` also TCP/IP headers and Ethernet framing for each of its
``ceil(b / MSS)`` segments, ``w(b) = b + ceil(b / MSS)·(H_tcpip + H_eth)``.

Two-way contention (``net.duplex_efficiency`` = e < 1; default 1, independent directions). Two-way TCP
over a shaped link moves each direction slower than one-way, because the acknowledgements of one
direction wait behind the other direction's data in the same queue (measured in docs/networks.md,
"Fidelity"). The receiver j of a message from i knows when its own uplink was sending to i; the part
``o`` of the message's transmission that overlapped it is stretched as if it had moved at e·B::

    tx_end      = arrival - latency_ij                    (when its last bit left i, without jitter)
    o           = overlap of [tx_end - tx, tx_end] with j's own transmissions to i
    arrival     = arrival + o·(1/e - 1)                   (before the downlink rule)

A message sent both ways at once, each alone on its link, then takes tx / e: e is the one-way time
over the both-ways time of a transfer, which ``scripts/bench_fidelity.py`` measures.

With one incoming flow no faster than the downlink, delivery == arrival, which is uplink_free + latency
when there is no jitter (pipelined; docs/architecture.md, "The link model").
Times are seconds on whichever clock drives the model (virtual or wall): the model only does
arithmetic, the clocks decide whether to sleep.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from typing import Optional

from lowbw.net.conditions import Conditions
from lowbw.net.topology import Topology, link_key, parse_link_key


@dataclass(frozen=True)
class SendTiming:
    start: float  # s: the message starts onto the sender's uplink
    tx_done: float  # s: last bit has left the sender
    arrival: float  # s: last bit has arrived at the receiver (before downlink contention)


class LinkModel:
    """One rank's view of the links: its uplink queue, its downlink, and jitter streams.

    Jitter for pair (i, j) is drawn from a stream seeded by (seed, i, j), so a run is reproducible
    whichever side draws it.
    """

    def __init__(self, topo: Topology, rank: int, seed: int = 0, conditions: Optional[Conditions] = None):
        self.topo = topo
        self.conditions = conditions if conditions is not None and conditions.active else None
        self.rank = rank
        self.seed = seed
        self.uplink_free = 0.0
        self.downlink_free = 0.0
        self._last_arrival: dict[tuple[int, int], float] = {}
        self._jitter_rng: dict[tuple[int, int], random.Random] = {}
        self._sending: dict[int, list[tuple[float, float]]] = {}  # dst -> own transmissions [start, end] (duplex)

    def _jitter(self, src: int, dst: int) -> float:
        mean = self.topo.link(src, dst).jitter_s
        if mean <= 0:
            return 0.0
        rng = self._jitter_rng.get((src, dst))
        if rng is None:
            rng = self._jitter_rng[(src, dst)] = random.Random(f"{self.seed}/{src}/{dst}")
        return rng.expovariate(1.0 / mean)

    def _fifo(self, src: int, dst: int, arrival: float) -> float:
        arrival = max(arrival, self._last_arrival.get((src, dst), -math.inf))
        self._last_arrival[(src, dst)] = arrival
        return arrival

    def transmit_seconds(self, src: int, dst: int, nbytes: int, t: float = 0.0) -> float:
        """Seconds the message occupies the sender's uplink if it starts at ``t``."""
        link = self.topo.link(src, dst)
        bw = link.bandwidth_bps
        if self.conditions is not None:
            bw = self.conditions.bandwidth_bps(bw, link.latency_s, t)
        return 0.0 if math.isinf(bw) else 8.0 * self.topo.framing.wire_bytes(nbytes) / bw

    def send(self, dst: int, nbytes: int, t: float) -> SendTiming:
        """Charge a message from this rank to ``dst`` entering the uplink at ``t``."""
        link = self.topo.link(self.rank, dst)
        start = max(t, self.uplink_free)
        if self.conditions is not None:
            start = self.conditions.start_time(self.rank, dst, start)
        tx_done = start + self.transmit_seconds(self.rank, dst, nbytes, start)
        if self.topo.semantics == "serialized":
            self.uplink_free = tx_done + link.latency_s
            arrival = self.uplink_free
        else:
            self.uplink_free = tx_done
            arrival = tx_done + link.latency_s
        arrival = self._fifo(self.rank, dst, arrival + self._jitter(self.rank, dst))
        if self.topo.duplex_efficiency < 1 and tx_done > start:
            self._sending.setdefault(dst, []).append((start, tx_done))
        return SendTiming(start, tx_done, arrival)

    def _duplex_delay(self, src: int, nbytes: int, arrival: float) -> float:
        """Extra seconds a message from ``src`` takes for overlapping this rank's own sending to ``src``."""
        spans = self._sending.get(src)
        if not spans:
            return 0.0
        end = arrival - self.topo.link(src, self.rank).latency_s
        begin = end - self.transmit_seconds(src, self.rank, nbytes, end)
        overlap = sum(max(0.0, min(end, b) - max(begin, a)) for a, b in spans)
        # later messages from src left its uplink after this one: spans that ended before it starts are done
        self._sending[src] = [(a, b) for a, b in spans if b > begin]
        return overlap * (1.0 / self.topo.duplex_efficiency - 1.0)

    def arrival_after_receipt(self, src: int, received_at: float) -> float:
        """Wall clock: the sender already waited out the transmission; add latency and jitter here."""
        link = self.topo.link(src, self.rank)
        return self._fifo(src, self.rank, received_at + link.latency_s + self._jitter(src, self.rank))

    def state_dict(self) -> dict:
        """Everything that makes the next message's timing depend on earlier ones (for checkpoints)."""
        return {
            "uplink_free": self.uplink_free,
            "downlink_free": self.downlink_free,
            "last_arrival": {link_key(a, b): v for (a, b), v in self._last_arrival.items()},
            "jitter": {link_key(a, b): [r.getstate()[0], list(r.getstate()[1]), r.getstate()[2]]
                       for (a, b), r in self._jitter_rng.items()},
            "sending": {str(d): [list(span) for span in spans] for d, spans in self._sending.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        pair = parse_link_key
        self.uplink_free, self.downlink_free = float(state["uplink_free"]), float(state["downlink_free"])
        self._last_arrival = {pair(k): float(v) for k, v in state["last_arrival"].items()}
        self._sending = {int(d): [(float(a), float(b)) for a, b in spans] for d, spans in state.get("sending", {}).items()}
        self._jitter_rng = {}
        for k, (version, internal, gauss) in state["jitter"].items():
            rng = random.Random()
            rng.setstate((version, tuple(internal), gauss))
            self._jitter_rng[pair(k)] = rng

    def deliver(self, src: int, nbytes: int, arrival: float) -> float:
        """Charge the receiver's downlink; called in consumption order. Returns the delivery time."""
        down = self.topo.downlink_bps[self.rank]
        rx = 0.0 if math.isinf(down) else 8.0 * self.topo.framing.wire_bytes(nbytes) / down
        if self.topo.duplex_efficiency < 1:
            arrival += self._duplex_delay(src, nbytes, arrival)
        delivery = max(arrival, self.downlink_free + rx)
        self.downlink_free = delivery
        return delivery

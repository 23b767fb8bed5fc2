"""Collectives of a replica group over the emulated links: ring all-reduce, and all-gather of codec payloads.

A stage's replicas agree through messages on the pipeline's own transport (channel ``CH_SYNC``), so
the link model charges them on the same node uplinks and downlinks as the activations and gradients
-- a node that sends both waits for both -- and they appear in the timeline (``send`` and
``sync_wait`` events labelled ``sync``) and in the bytes per link, hence in the network energy.
A torch collective (gloo's all-reduce) would move the bytes at loopback speed, unseen by the link model.

Two ways to average a flat float32 vector of N entries over R replicas, each rank sending to the
next in the ring and receiving from the previous one:

- uncompressed, the bandwidth-optimal ring all-reduce (Patarasuk & Yuan 2009; NCCL's ring): R - 1
  steps of reduce-scatter on R chunks, R - 1 of all-gather; every rank sends 2 (R - 1) / R x 4N
  bytes, a group 2 (R - 1) x 4N;
- through a codec: each rank encodes its vector once -- each parameter's tensor in its own shape,
  with error feedback (lowbw.replicas.per_tensor) --, the payloads go round the ring unchanged
  (R - 1 steps), and every rank decodes all R in replica order and averages them. Every rank sends (R - 1) payloads, a group R (R - 1) payloads.
  Nothing is re-encoded on the way, so the error is the codec's own, once -- a ring that re-quantises
  partial sums at every hop compounds it -- at the price of bytes growing with R.

Either way every replica ends with the same bits (the reductions run in the same order everywhere),
so replicas that start equal stay equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lowbw.metrics.timeline import Event
from lowbw.net.clock import Clock
from lowbw.net.transport import CH_SYNC, Transport
from lowbw.replicas.per_tensor import PerTensor

PHASE_SYNC = 2  # message keys (phase, step, exchange, 0): after PHASE_TRAIN (0) and PHASE_EVAL (1)


@dataclass(frozen=True)
class Exchange:
    """What a replica group sends to average once: a ring all-reduce of ``amount`` float32 entries, or an
    all-gather of one payload of ``amount`` bytes from each member."""

    kind: str  # "ring" | "gather"
    amount: int

    def group_bytes(self, replicas: int) -> int:
        return ring_bytes(self.amount, replicas) if self.kind == "ring" else gather_bytes(self.amount, replicas)

    def hops(self, replicas: int, index: int) -> list[int]:
        """Bytes member ``index`` sends at each hop, in order (what ReplicaGroup's collectives send)."""
        if self.kind == "gather":
            return [self.amount] * (replicas - 1)
        base, extra = divmod(self.amount, replicas)  # torch.tensor_split's chunk sizes
        chunk = [4 * (base + (c < extra)) for c in range(replicas)]
        return ([chunk[(index - s) % replicas] for s in range(replicas - 1)]
                + [chunk[(index + 1 - s) % replicas] for s in range(replicas - 1)])


def ring_bytes(n: int, replicas: int) -> int:
    """Bytes a replica group sends to ring-all-reduce ``n`` float32 entries: 2 (R - 1) x 4n."""
    return 2 * (replicas - 1) * 4 * n


def gather_bytes(payload_nbytes: int, replicas: int) -> int:
    """Bytes a replica group sends to all-gather one payload of each replica: R (R - 1) payloads."""
    return replicas * (replicas - 1) * payload_nbytes


class ReplicaGroup:
    """One rank's view of its replica group: who is next and previous in the ring, and the exchanges.

    ``record(kind, t0, t1, nbytes, peer)`` receives the timeline's events; ``planned``: seconds to charge
    the arithmetic of a reduction on the virtual clock (0.0 under planned durations, as the codecs'
    work in the pipeline; None: measured)."""

    def __init__(self, transport: Transport, clock: Clock, members: list[int], rank: int,
                 planned: Optional[float] = None, target: Optional[Exchange] = None):
        self.transport, self.clock, self.members, self.rank = transport, clock, members, rank
        self.size = len(members)
        self.index = members.index(rank)
        self.next = members[(self.index + 1) % self.size]
        self.prev = members[(self.index - 1) % self.size]
        self.planned = planned
        self._exchanges = 0  # keys of this group's messages: the same sequence on every member
        self.events: list[Event] = []
        self.bytes_sent: dict[int, int] = {}  # destination rank -> bytes the link charged
        self.step = 0
        # under a regime: the target's exchange, whose hops the link model charges instead of the run's
        # (lowbw.replicas.charge): the same chunks of the target's parameters that lowbw-simulate plays
        self.target = target
        self._hop = 0  # hop of the current collective
    def _exchange(self, payload: torch.Tensor, nbytes_in: int) -> torch.Tensor:
        """Send ``payload`` to the next member, take ``nbytes_in`` bytes from the previous one."""
        key = (PHASE_SYNC, self.step, self._exchanges, 0)
        self._exchanges += 1
        t = self.transport
        out_charge = in_charge = None
        if self.target is not None:
            out_charge = self.target.hops(self.size, self.index)[self._hop]
            in_charge = self.target.hops(self.size, (self.index - 1) % self.size)[self._hop]
        self._hop += 1
        t.expect(self.prev, CH_SYNC, key, nbytes_in)
        t.send(self.next, CH_SYNC, key, payload, charge=out_charge)
        n = t.charged_bytes(CH_SYNC, payload.numel()) if out_charge is None else out_charge
        self.bytes_sent[self.next] = self.bytes_sent.get(self.next, 0) + n
        now = self.clock.now()
        self.events.append(Event(self.rank, "send", now, now, self.step, "sync", n, self.next))
        msg = t.recv(self.prev, CH_SYNC, key)
        self.clock.wait_until(t.delivery_time(msg, charge=in_charge))
        self.events.append(Event(self.rank, "sync_wait", now, self.clock.now(), self.step, "sync", msg.nbytes,
                                 self.prev))
        return msg.payload

    def _compute(self, fn: Callable[[], object]) -> object:
        out, t0, t1 = self.clock.compute(fn, self.planned)
        self.events.append(Event(self.rank, "sync", t0, t1, self.step, "sync"))
        return out

    def all_reduce_mean(self, flat: torch.Tensor) -> None:
        """Average ``flat`` (1-D float32, CPU) over the group in place: the ring all-reduce."""
        R, i = self.size, self.index
        if R == 1:
            return
        self._hop = 0
        chunks = list(flat.tensor_split(R))

        def raw(c: torch.Tensor) -> torch.Tensor:
            return c.contiguous().view(torch.uint8)

        for s in range(R - 1):  # reduce-scatter: after it, chunk (i + 1) mod R holds the whole sum
            out, into = chunks[(i - s) % R], chunks[(i - s - 1) % R]
            got = self._exchange(raw(out), into.numel() * 4).view(torch.float32)
            self._compute(lambda: into.add_(got))
        for s in range(R - 1):  # all-gather the summed chunks
            out, into = chunks[(i + 1 - s) % R], chunks[(i - s) % R]
            into.copy_(self._exchange(raw(out), into.numel() * 4).view(torch.float32))
        self._compute(lambda: flat.div_(R))

    def all_gather_mean(self, flat: torch.Tensor, encoder: PerTensor, decoders: list[PerTensor]) -> None:
        """Average ``flat`` in place through a codec: encode once, pass the payloads round, decode all R."""
        R, i = self.size, self.index
        if R == 1:
            return
        self._hop = 0
        nbytes = encoder.nbytes
        payloads: list[Optional[torch.Tensor]] = [None] * R
        payloads[i] = self._compute(lambda: encoder.encode(flat))
        for s in range(R - 1):
            out, into = (i - s) % R, (i - s - 1) % R
            payloads[into] = self._exchange(payloads[out], nbytes).clone()

        def average() -> None:
            flat.zero_()
            for j in range(R):  # replica order on every member: the same bits everywhere
                flat.add_(decoders[j].decode(payloads[j]).to(flat.dtype))
            flat.div_(R)

        self._compute(average)

    def take_events(self) -> tuple[list[Event], dict[int, int]]:
        """The events and bytes since the last call (for the step's report)."""
        events, sent = self.events, self.bytes_sent
        self.events, self.bytes_sent = [], {}
        return events, sent


class Averager:
    """Averages a flat vector laid out as ``shapes`` over a replica group: ring all-reduce, or all-gather
    through ``codec`` (per tensor, with error feedback)."""

    def __init__(self, group: ReplicaGroup, codec: object, shapes: list[tuple[int, ...]]):
        self.group = group
        self.encoder = PerTensor(codec, shapes)
        self.lossless = self.encoder.lossless
        self.decoders = [PerTensor(codec, shapes) for _ in range(group.size)]  # per sender: stateful receivers

    def __call__(self, flat: torch.Tensor) -> None:
        if self.lossless:
            self.group.all_reduce_mean(flat)
        else:
            self.group.all_gather_mean(flat, self.encoder, self.decoders)

    def state_dict(self) -> dict:
        return {"encoder": self.encoder.state_dict(), "decoders": [d.state_dict() for d in self.decoders]}

    def load_state_dict(self, state: dict) -> None:
        self.encoder.load_state_dict(state["encoder"])
        for d, s in zip(self.decoders, state["decoders"]):
            d.load_state_dict(s)

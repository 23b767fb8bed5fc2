"""The player: a schedule run in event time with no tensors -- the validator, the timing model, the simulator's engine.

Two phases:

* :func:`~lowbw.pipeline.program.compile_schedule` (lowbw.pipeline.program) checks the rules once, without
  timing -- each rank runs its list in order, a compute after its inputs, a receive after its send, every
  message received -- and raises :class:`ScheduleError` naming the rank and the action. A valid schedule
  comes back as a :class:`~lowbw.pipeline.program.Program`: every action in one order in which each receive
  follows its send.
* :class:`Player` times a program: compute advances the rank's clock by ``duration(rank, action)``; a send
  hands ``nbytes(action)`` bytes to the rank's :class:`~lowbw.net.link.LinkModel` (uplink queue, latency,
  jitter); a receive waits for the delivery, charged to the receiver's downlink in the order the rank
  consumes its messages. Every link-model call of a rank happens in that rank's list order, so any order
  in which each receive follows its send gives the same times -- the program's order is one. The player
  carries the links' state from step to step, as a run does.

:func:`play` does both for one step and returns the :class:`Timeline`. The compiling functions are
importable from here too (``compile_schedule``, ``validate_schedule``, ``message_key``, ``peer_of``), where
they lived before lowbw.pipeline.program held them.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from typing import Callable, Optional

from lowbw.metrics.timeline import Event, Timeline
from lowbw.net.link import LinkModel
from lowbw.pipeline.actions import Action, Kind, Schedule
from lowbw.pipeline.program import Program, compile_schedule, message_key, peer_of, validate_schedule

__all__ = ["Player", "Program", "StepResult", "compile_schedule", "message_key", "peer_of", "play",
           "validate_schedule"]

_COMPUTE_EVENT = {
    Kind.FORWARD: "forward",
    Kind.FULL_BACKWARD: "backward",
    Kind.BACKWARD_INPUT: "backward_input",
    Kind.BACKWARD_WEIGHT: "backward_weight",
}

# ---- playing: the timing model ------------------------------------------------------------------


# Operation codes of the played plan.
_COMPUTE, _SEND, _RECV = 0, 1, 2


class StepResult:
    """One played step: per-rank end time and busy seconds, bytes per (src, dst) link, messages, events."""

    __slots__ = ("end", "busy", "link_bytes", "messages", "events")

    def __init__(self, end: list, busy: list, link_bytes: dict, messages: int, events: list):
        self.end, self.busy, self.link_bytes, self.messages, self.events = end, busy, link_bytes, messages, events


def _time_invariant(link: LinkModel, n_ranks: int) -> bool:
    """No jitter on the rank's outgoing pairs, no outage or bandwidth trace, and no two-way contention
    (``duplex_efficiency`` 1): a message's cost is fixed."""
    cond = link.conditions
    if cond is not None and (cond.outages or cond.trace_t) or link.topo.duplex_efficiency < 1:
        return False
    return all(link.topo.link(link.rank, d).jitter_s <= 0 for d in range(n_ranks) if d != link.rank)


class _LinkCosts:
    """The fixed costs of a rank's messages on time-invariant links, asked of its LinkModel once per size.

    A send at time t on the rank's uplink (``LinkModel.send`` with no jitter, outage or trace)::

        tx_done = max(t, uplink_free) + tx          tx = LinkModel.transmit_seconds(r, dst, bytes)
        uplink_free = tx_done + hold                 hold = latency (serialized) or 0 (pipelined)
        arrival = tx_done + latency

    and its receipt (``LinkModel.deliver``): delivery = max(arrival, downlink_free + rx). The FIFO rule per
    pair (``LinkModel._fifo``) never binds without jitter: the next message on a pair starts at or after
    this one's tx_done (serialized: + latency), so it arrives no earlier; it is left out.

    ``send[dst][bytes]`` = (tx, hold, latency) and ``receive[src][bytes]`` = rx, in s, worked out the first
    time they are asked (peer by peer, then size by size: no tuple key to build per message); without a
    LinkModel (free links, or links played call by call) they are 0.
    """

    def __init__(self, link: Optional[LinkModel]):
        self.link = link
        self.send = _Memo(lambda peer: _Memo(functools.partial(self._send, peer)))
        self.receive = _Memo(lambda peer: _Memo(functools.partial(self._receive, peer)))

    def _send(self, peer: int, size: int) -> tuple[float, float, float]:
        link = self.link
        if link is None:
            return 0.0, 0.0, 0.0
        r, topo = link.rank, link.topo
        latency = topo.link(r, peer).latency_s
        hold = latency if topo.semantics == "serialized" else 0.0
        return link.transmit_seconds(r, peer, size, 0.0), hold, latency

    def _receive(self, peer: int, size: int) -> float:
        if self.link is None:
            return 0.0
        # the delivery a fresh downlink gives a message that arrived at -inf: 0 + rx, exactly
        return LinkModel(self.link.topo, self.link.rank).deliver(peer, size, -math.inf)


class _Memo(dict):
    """``memo[key]`` is ``fn(key)``, worked out the first time it is asked."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def __missing__(self, key):
        value = self[key] = self.fn(key)
        return value


class Player:
    """Plays steps of a compiled program with fixed ``duration(rank, action)`` and ``nbytes(action)``.

    ``links[r]`` charges rank r's sends and receives and keeps their queues from step to step (None: free
    links). Links whose every message costs a fixed time (no jitter, no outage, no bandwidth trace:
    ``fixed``) are played by arithmetic inlined in :func:`_run_fixed`; the others, and steps whose events
    are recorded, through ``LinkModel.send`` and ``deliver`` call by call (:func:`_run_linked`). Both give
    the same numbers (tests/test_player.py).
    """

    def __init__(self, prog: Program, duration: Callable[[int, Action], float], nbytes: Callable[[Action], int],
                 links: Optional[dict[int, LinkModel]] = None):
        self.prog, self.links = prog, links
        R = prog.sched.n_ranks
        self.fixed = links is None or all(_time_invariant(links[r], R) for r in range(R))
        self.busy = [0.0] * R  # s per rank per step, summed in list order
        self.link_bytes: dict[tuple[int, int], int] = {}
        self.messages = 0
        self.sizes = [0] * prog.n_messages  # bytes per message, as its sender sends it
        for r in range(R):
            self._sends(r, nbytes)
        self.ops = [self._rank_ops(r, duration) for r in range(R)]  # per rank, in list order

    def _sends(self, r: int, nbytes: Callable) -> None:
        """Sizes of rank r's messages, and the bytes and messages per link they make."""
        prog, sizes = self.prog, self.sizes
        acts, code, mids, peers = prog.sched.actions[r], prog.code[r], prog.mid[r], prog.peer[r]
        sends = [i for i in prog.comm[r] if code[i] < 6]
        sent = list(map(nbytes, [acts[i] for i in sends]))
        for i, size in zip(sends, sent):
            sizes[mids[i]] = size
        to = [peers[i] for i in sends]
        for peer in dict.fromkeys(to):  # the peers in the order of their first message
            self.link_bytes[(r, peer)] = sum(itertools.compress(sent, map(peer.__eq__, to)))
        self.messages += len(sends)

    def _rank_ops(self, r: int, duration: Callable) -> list[tuple]:
        """Rank r's actions as run-loop tuples: (0, s) compute, (1, message, tx, hold, latency) send,
        (2, message, rx) receive."""
        prog, sizes = self.prog, self.sizes
        link = self.links[r] if self.links is not None and self.fixed else None
        costs = _LinkCosts(link)
        send, receive = costs.send, costs.receive
        ops = [(_COMPUTE, duration(r, a)) if c < 4
               else (_SEND, mid) + send[peer][sizes[mid]] if c < 6
               else (_RECV, mid, receive[peer][sizes[mid]])
               for a, c, mid, peer in zip(prog.sched.actions[r], prog.code[r], prog.mid[r], prog.peer[r])]
        # busy seconds summed left to right in list order (reduce: sum() may compensate rounding)
        self.busy[r] = functools.reduce(operator.add, [op[1] for op in ops if op[0] == _COMPUTE], 0.0)
        return ops

    def play(self, start: Optional[dict[int, float]] = None, step: int = 0, record: bool = False) -> StepResult:
        """One step from per-rank start times (default 0); ``record``: also return its Events."""
        R, links, prog = self.prog.sched.n_ranks, self.links, self.prog
        clock = [(start or {}).get(r, 0.0) for r in range(R)]
        if record or not self.fixed:
            rec: Optional[list] = [] if record else None
            _run_linked(prog, self.ops, self.sizes, links, clock, rec)
            events = self._events(rec, step) if rec is not None else []
        else:
            events = []
            if links is None:
                _run_fixed(prog.segments, self.ops, clock, [-math.inf] * R, [-math.inf] * R, prog.n_messages)
            else:
                up, down = [links[r].uplink_free for r in range(R)], [links[r].downlink_free for r in range(R)]
                _run_fixed(prog.segments, self.ops, clock, up, down, prog.n_messages)
                for r in range(R):
                    links[r].uplink_free, links[r].downlink_free = up[r], down[r]
        return StepResult(clock, list(self.busy), dict(self.link_bytes), self.messages, events)

    def _events(self, rec: list, step: int) -> list[Event]:
        prog, out = self.prog, []
        for r, i, t0, t1 in rec:
            c, a = prog.code[r][i], prog.sched.actions[r][i]
            if c < 4:
                out.append(Event(r, _COMPUTE_EVENT[a.kind], t0, t1, step, str(a)))
            elif c < 6:
                out.append(Event(r, "send", t0, t1, step, str(a), self.sizes[prog.mid[r][i]], prog.peer[r][i]))
            else:
                out.append(Event(r, "recv_wait", t0, t1, step, str(a), 0, prog.peer[r][i]))
        return out


def _run_fixed(segments: list, ops: list, clock: list, up: list, down: list, n_messages: int) -> None:
    """The inner loop on time-invariant (or free) links: clocks, uplinks and downlinks advanced in place."""
    arrival = [0.0] * n_messages
    for r, first, end in segments:  # a run of one rank's actions: its clock and links held in locals
        t, u, dn = clock[r], up[r], down[r]
        for op in ops[r][first:end]:
            code = op[0]
            if code == _COMPUTE:
                t += op[1]
            elif code == _SEND:
                done = (u if u > t else t) + op[2]
                u = done + op[3]
                arrival[op[1]] = done + op[4]
            else:
                dn += op[2]
                a = arrival[op[1]]
                if a > dn:
                    dn = a
                if dn > t:
                    t = dn
        clock[r], up[r], down[r] = t, u, dn


def _run_linked(prog: Program, ops: list, sizes: list, links: Optional[dict[int, LinkModel]], clock: list,
                rec: Optional[list]) -> None:
    """The inner loop through the LinkModels' own calls (jitter, outages, bandwidth traces; None: free
    links); ``rec`` collects (rank, index, start, end) of every action."""
    arrival = [0.0] * prog.n_messages
    for r, first, end in prog.segments:
        t, link, peers = clock[r], links[r] if links is not None else None, prog.peer[r]
        for i in range(first, end):
            op, t0 = ops[r][i], t
            if op[0] == _COMPUTE:
                t += op[1]
            elif op[0] == _SEND:
                arrival[op[1]] = link.send(peers[i], sizes[op[1]], t).arrival if link is not None else t
            else:
                d = link.deliver(peers[i], sizes[op[1]], arrival[op[1]]) if link is not None else arrival[op[1]]
                if d > t:
                    t = d
            if rec is not None:
                rec.append((r, i, t0, t))
        clock[r] = t


def play(
    sched: Schedule,
    duration: Callable[[int, Action], float] = lambda r, a: 1.0,
    nbytes: Callable[[Action], int] = lambda a: 0,
    links: Optional[dict[int, LinkModel]] = None,
    start: Optional[dict[int, float]] = None,
    step: int = 0,
    timeline: Optional[Timeline] = None,
) -> Timeline:
    """Check and play one step of ``sched``; ``links[r]`` charges rank r's messages (None: free links)."""
    res = Player(compile_schedule(sched), duration, nbytes, links).play(start, step, record=True)
    tl = timeline if timeline is not None else Timeline("virtual", sched.n_ranks)
    tl.events.extend(res.events)
    return tl

"""The player: a schedule run in event time with no tensors -- the validator, the timing model, the simulator's engine.

Rules (the executor follows the same ones, so a schedule that plays here runs there): each rank runs its
action list in order; a compute action needs its inputs on this rank (the previous stage's forward or a
received activation; the forward and the output gradient for a backward; the input-gradient half for a
weight-gradient half; the computation a send ships) and runs once per step; a receive blocks until its
message has been sent; every message sent is received.

Two phases:

* :func:`compile_schedule` checks those rules once, without timing -- they do not depend on durations or
  links -- and raises :class:`ScheduleError` naming the rank and the action (a stage the rank does not
  hold, a compute before its inputs, a receive nothing sends: deadlock, a send nobody receives). A valid
  schedule comes back as a :class:`Program`: every action in one order in which each receive follows its
  send (the order in which the checks ran them: ranks swept in ascending order, each as far as it goes).
* :class:`Player` times a program: compute advances the rank's clock by ``duration(rank, action)``; a send
  hands ``nbytes(action)`` bytes to the rank's :class:`~lowbw.net.link.LinkModel` (uplink queue, latency,
  jitter); a receive waits for the delivery, charged to the receiver's downlink in the order the rank
  consumes its messages. Every link-model call of a rank happens in that rank's list order, so any order
  in which each receive follows its send gives the same times -- the program's order is one. The player
  carries the links' state from step to step, as a run does.

:func:`play` does both for one step and returns the :class:`Timeline`; :func:`validate_schedule` also
checks that every stage runs the forward and the backward of every microbatch.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Callable, Optional

from lowbw.errors import ScheduleError
from lowbw.metrics.timeline import Event, Timeline
from lowbw.net.link import LinkModel
from lowbw.pipeline.actions import Action, Kind, Schedule

_COMPUTE_EVENT = {
    Kind.FORWARD: "forward",
    Kind.FULL_BACKWARD: "backward",
    Kind.BACKWARD_INPUT: "backward_input",
    Kind.BACKWARD_WEIGHT: "backward_weight",
}

def message_key(a: Action, n_stages: int) -> tuple[str, int, int]:
    """The (direction, receiving stage, microbatch) a SEND produces or a RECV consumes."""
    if a.kind == Kind.SEND_F:
        return ("F", a.stage + 1, a.microbatch)
    if a.kind == Kind.SEND_B:
        return ("B", a.stage - 1, a.microbatch)
    if a.kind == Kind.RECV_F:
        return ("F", a.stage, a.microbatch)
    if a.kind == Kind.RECV_B:
        return ("B", a.stage, a.microbatch)
    raise ValueError(f"{a} is not a communication action")


def _neighbour(a: Action) -> int:
    return a.stage + 1 if a.kind in (Kind.SEND_F, Kind.RECV_B) else a.stage - 1


def peer_of(a: Action, sched: Schedule) -> int:
    """The rank on the other end of a communication action."""
    neighbour = _neighbour(a)
    if not 0 <= neighbour < sched.n_stages:
        raise ScheduleError(f"action {a}: stage {a.stage} has no neighbour stage {neighbour}")
    return sched.stage_to_rank[neighbour]


# ---- compiling: the rules, checked once ---------------------------------------------------------

# Action kinds as small integers: computes 0-3 (also their flag slot), sends 4-5, receives 6-7.
_CODE = {Kind.FORWARD: 0, Kind.FULL_BACKWARD: 1, Kind.BACKWARD_INPUT: 2, Kind.BACKWARD_WEIGHT: 3,
         Kind.SEND_F: 4, Kind.SEND_B: 5, Kind.RECV_F: 6, Kind.RECV_B: 7}
# Flags per (stage, microbatch): slots 0-3 "this compute ran", then "the input gradient is there" (B or I
# ran) and "the forward / backward message was received". Flag 0 of the whole array is "needs nothing".
_GRAD, _GOT_F, _GOT_B, _SLOTS = 4, 5, 6, 7
# Why a rank's action fails, found by the rank-local pass; raised when the sweep reaches it: its first
# input is missing (a backward's forward; the only input of the others), a backward's output gradient is.
_NOT_READY, _NO_GRADIENT, _NO_NEIGHBOUR, _TWICE = 1, 2, 3, 4


class Program:
    """A valid schedule compiled for playing.

    Per rank r and action i: ``code[r][i]`` (0-3 compute, 4-5 send, 6-7 receive), ``mid[r][i]`` (message
    number, the same for a send and its receive) and ``peer[r][i]`` (the rank on the other end); ``comm[r]``:
    the indices of rank r's sends and receives.
    ``segments``: (rank, first, end) runs of actions in an order in which each receive follows its send --
    the order the checks ran them. ``n_messages`` bounds the message numbers.
    """

    def __init__(self, sched: Schedule, code: list, mid: list, peer: list, comm: list, segments: list,
                 n_messages: int):
        self.sched, self.code, self.mid, self.peer, self.comm = sched, code, mid, peer, comm
        self.segments, self.n_messages = segments, n_messages
        self.ran = b""  # flags of what ran, per (stage, microbatch) and slot (see _SLOTS)
        self.snapshot: tuple = ()  # the actions compiled, per rank


def _check_held(sched: Schedule, r: int) -> None:
    """Raise for rank r's first action on a stage it does not hold or a microbatch out of range."""
    acts, S, M = sched.actions[r], sched.n_stages, sched.n_microbatches
    if {a[0] for a in acts} <= set(sched.stages_of(r)) and {a[2] for a in acts} <= set(range(M)):
        return
    for a in acts:
        if not 0 <= a.stage < S or sched.stage_to_rank[a.stage] != r:
            raise ScheduleError(f"rank {r} action {a}: stage {a.stage} is not held by rank {r}")
        if not 0 <= a.microbatch < M:
            raise ScheduleError(f"rank {r} action {a}: microbatch {a.microbatch} outside 0..{M - 1}")


# Per code of a send or receive: (receiving stage - this stage, direction 0 = F / 1 = B) of its message,
# and the other end's stage - this stage.
_MESSAGE = {4: (1, 0), 5: (-1, 1), 6: (0, 0), 7: (0, 1)}
_OTHER_END = {4: 1, 5: -1, 6: -1, 7: 1}


def _messages(sched: Schedule, r: int, codes: list) -> tuple[list, list, list]:
    """Rank r's sends and receives: their indices, and per action its message number (2 x (receiving stage
    x microbatches + microbatch) + direction) and the rank on the other end; -1 for computes and for a
    stage with no neighbour (such a send breaks the rules before its number is used)."""
    S, M, to_rank, acts = sched.n_stages, sched.n_microbatches, sched.stage_to_rank, sched.actions[r]
    comm = [i for i, c in enumerate(codes) if c >= 4]
    mids = [-1] * len(acts)
    peers = [-1] * len(acts)
    for i in comm:
        (s, _, mb), c = acts[i], codes[i]
        (d, k), other = _MESSAGE[c], s + _OTHER_END[c]
        if 0 <= s + d < S:
            mids[i] = 2 * ((s + d) * M + mb) + k
        if 0 <= other < S:
            peers[i] = to_rank[other]
    return comm, mids, peers


def _scan_rank(sched: Schedule, r: int, have: bytearray) -> tuple[list, list, list, list, tuple]:
    """Rank r's actions in list order: their codes, the :func:`_messages` of the rank, and the first action
    that breaks a rank-local rule as (index, why), or (len, 0). ``have``: the flags, set as actions run."""
    S, M, to_rank, acts = sched.n_stages, sched.n_microbatches, sched.stage_to_rank, sched.actions[r]
    row, last = _SLOTS * M, S - 1
    codes = [_CODE[a[1]] for a in acts]
    fail = (len(acts), 0)
    for i, ((s, _, mb), c) in enumerate(zip(acts, codes)):
        f = 1 + (s * M + mb) * _SLOTS
        if c >= 6:  # a receive: the message is here
            have[f + _GOT_F + c - 6] = 1
            continue
        if c >= 4:  # a send: of the forward's output, or of the input gradient
            why = 0 if have[f if c == 4 else f + _GRAD] else _NOT_READY
            if not why and not 0 <= (s + 1 if c == 4 else s - 1) < S:
                why = _NO_NEIGHBOUR
        else:
            if c == 0:
                ready = s == 0 or have[f - row if to_rank[s - 1] == r else f + _GOT_F]
            elif c == 3:
                ready = have[f + 2]
            else:
                ready = have[f] and (s == last or have[f + row + _GRAD if to_rank[s + 1] == r else f + _GOT_B])
            if not ready:
                why = _NO_GRADIENT if c in (1, 2) and have[f] else _NOT_READY
            else:
                why = _TWICE if have[f + c] else 0
            have[f + c] = 1
            if c == 1 or c == 2:
                have[f + _GRAD] = 1
        if why and not fail[1]:
            fail = (i, why)
    return (codes, *_messages(sched, r, codes), fail)


def _sweep(sched: Schedule, codes: list, mids: list, comm: list, fails: list,
           n_messages: int) -> tuple[list, list, bytearray]:
    """Run every rank as far as it goes, ranks in ascending order, until no rank moves; only sends and
    receives matter (computes never block), and a rank's first broken rule raises when it is reached.

    Returns (segments run, final position per rank, messages sent and not received)."""
    R = sched.n_ranks
    posted = bytearray(n_messages)
    pc, cpc = [0] * R, [0] * R
    segments: list[tuple[int, int, int]] = []
    progressed = True
    while progressed:
        progressed = False
        for r in range(R):
            ops, j, (fail_at, why), code, mid = comm[r], cpc[r], fails[r], codes[r], mids[r]
            end, n_ops = len(code), len(ops)
            while j < n_ops:
                i = ops[j]
                if fail_at <= i:
                    _raise_broken(sched, r, fail_at, why)
                if code[i] < 6:  # a send
                    if posted[mid[i]]:
                        a = sched.actions[r][i]
                        raise ScheduleError(f"rank {r} action {a}: sends {message_key(a, sched.n_stages)} to rank "
                                            f"{peer_of(a, sched)} twice")
                    posted[mid[i]] = 1
                elif posted[mid[i]]:
                    posted[mid[i]] = 0
                else:
                    end = i  # blocked until some rank sends it
                    break
                j += 1
            if j == n_ops and fail_at < end:
                _raise_broken(sched, r, fail_at, why)
            if end > pc[r]:
                segments.append((r, pc[r], end))
                pc[r], cpc[r] = end, j
                progressed = True
    return segments, pc, posted


def _raise_broken(sched: Schedule, rank: int, pos: int, why: int) -> None:
    a = sched.actions[rank][pos]
    s, mb = a.stage, a.microbatch
    if why == _NO_NEIGHBOUR:
        peer_of(a, sched)  # raises, naming the missing stage
    if why == _TWICE:
        raise ScheduleError(f"rank {rank} action {a}: runs twice in one step")
    missing = {
        Kind.FORWARD: f"its input ({s}RECV_F{mb})",
        Kind.FULL_BACKWARD: f"{s}F{mb}" if why == _NOT_READY else f"its output gradient ({s}RECV_B{mb})",
        Kind.BACKWARD_WEIGHT: f"{s}I{mb}",
        Kind.SEND_F: f"{s}F{mb}",
        Kind.SEND_B: f"{s}B{mb} or {s}I{mb}",
    }
    missing[Kind.BACKWARD_INPUT] = missing[Kind.FULL_BACKWARD]
    raise ScheduleError(f"rank {rank} action {a}: runs before {missing[a.kind]} on this rank")


def _is_sent_later(sched: Schedule, rank: int, pos: int) -> bool:
    key = message_key(sched.actions[rank][pos], sched.n_stages)
    return any(
        a.kind in (Kind.SEND_F, Kind.SEND_B) and peer_of(a, sched) == rank and message_key(a, sched.n_stages) == key
        for acts in sched.actions.values()
        for a in acts
    )


def _raise_incomplete(sched: Schedule, mids: list, segments: list, pc: list, posted: bytearray) -> None:
    """Raise if a rank is stuck (deadlock) or a message is left unreceived; else return."""
    stuck = [r for r in range(sched.n_ranks) if pc[r] < len(sched.actions[r])]
    if stuck:
        where = "; ".join(
            f"rank {r} waits at {sched.actions[r][pc[r]]} for a message "
            f"{'that a blocked rank has not sent yet' if _is_sent_later(sched, r, pc[r]) else 'no rank sends'}"
            for r in stuck
        )
        raise ScheduleError(f"schedule {sched.name!r} deadlocks: {where}")
    if any(posted):
        # the unreceived message sent first (its last sending, if it was received and sent again)
        last_post: dict[int, tuple[int, int, int]] = {}
        n = 0
        for r, first, end in segments:
            for i in range(first, end):
                if sched.actions[r][i].kind in (Kind.SEND_F, Kind.SEND_B) and posted[mids[r][i]]:
                    last_post[mids[r][i]] = (n, r, i)
                n += 1
        _, r, i = min(last_post.values())
        a = sched.actions[r][i]
        raise ScheduleError(f"rank {r} action {a}: sends {message_key(a, sched.n_stages)} to rank "
                            f"{peer_of(a, sched)}, which never receives it")


def _snapshot(sched: Schedule) -> tuple:
    return tuple(tuple(sched.actions[r]) for r in range(sched.n_ranks))


# The last schedule compiled. build_schedule validates a schedule and the simulator then plays it: this
# spares the second compilation (a third of the simulator's CPU time at 64 stages x 256 microbatches). It
# is used only while the schedule is the same object with the same actions (the snapshot).
_last_compiled: list[Program] = []


def compile_schedule(sched: Schedule) -> Program:
    """Check the rules (raising :class:`ScheduleError` naming rank and action) and compile for playing.

    The errors are those a step-by-step run would meet first: ranks advance in ascending order, each as
    far as it can, and a rank's first action that breaks a rule raises when the rank gets there."""
    snapshot = _snapshot(sched)
    if _last_compiled and _last_compiled[0].sched is sched and _last_compiled[0].snapshot == snapshot:
        return _last_compiled[0]
    for r in range(sched.n_ranks):
        _check_held(sched, r)
    ran = bytearray(1 + sched.n_stages * sched.n_microbatches * _SLOTS)
    ran[0] = 1
    scans = [_scan_rank(sched, r, ran) for r in range(sched.n_ranks)]
    codes, comm, mids, peers, fails = (list(x) for x in zip(*scans)) if scans else ([], [], [], [], [])
    n_messages = 2 * sched.n_stages * sched.n_microbatches
    segments, pc, posted = _sweep(sched, codes, mids, comm, fails, n_messages)
    _raise_incomplete(sched, mids, segments, pc, posted)
    prog = Program(sched, codes, mids, peers, comm, segments, n_messages)
    prog.ran, prog.snapshot = bytes(ran), snapshot
    _last_compiled[:] = [prog]
    return prog


def validate_schedule(sched: Schedule) -> Program:
    """Raise ScheduleError unless every rank finishes and every stage runs F and B for every microbatch."""
    prog = compile_schedule(sched)
    ran = prog.ran  # per (stage, microbatch) in order: did F, B, I, W run
    forward, full, inp, weight = (ran[1 + slot::_SLOTS] for slot in range(4))
    backward = bytes(map(max, full, map(min, inp, weight)))
    if 0 not in forward and (0 not in backward or sched.name == "forward_only"):
        return prog
    S, M = sched.n_stages, sched.n_microbatches
    for s in range(S):
        r = sched.stage_to_rank[s]
        for mb in range(M):
            if not forward[s * M + mb]:
                raise ScheduleError(f"rank {r}: stage {s} never runs the forward of microbatch {mb} ({s}F{mb})")
            if not backward[s * M + mb] and sched.name != "forward_only":
                raise ScheduleError(f"rank {r}: stage {s} never runs the backward of microbatch {mb} ({s}B{mb})")
    raise AssertionError("a stage misses a forward or a backward, but none was found")


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

    ``send[(dst, bytes)]`` = (tx, hold, latency) and ``receive[(src, bytes)]`` = rx, in s, for each (peer,
    bytes) given; without a LinkModel (free links, or links played call by call) they are 0.
    """

    def __init__(self, link: Optional[LinkModel], pairs: set[tuple[int, int]]):
        self.send: dict[tuple[int, int], tuple[float, float, float]] = {}
        self.receive: dict[tuple[int, int], float] = {}
        for peer, size in pairs:
            if link is None:
                self.send[(peer, size)], self.receive[(peer, size)] = (0.0, 0.0, 0.0), 0.0
                continue
            r, topo = link.rank, link.topo
            latency = topo.link(r, peer).latency_s
            hold = latency if topo.semantics == "serialized" else 0.0
            self.send[(peer, size)] = (link.transmit_seconds(r, peer, size, 0.0), hold, latency)
            # the delivery a fresh downlink gives a message that arrived at -inf: 0 + rx, exactly
            self.receive[(peer, size)] = LinkModel(topo, r).deliver(peer, size, -math.inf)


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
        sent: dict[int, int] = {}
        for i, size in zip(sends, map(nbytes, [acts[i] for i in sends])):
            sizes[mids[i]] = size
            sent[peers[i]] = sent.get(peers[i], 0) + size
        self.link_bytes.update(((r, peer), n) for peer, n in sent.items())
        self.messages += len(sends)

    def _rank_ops(self, r: int, duration: Callable) -> list[tuple]:
        """Rank r's actions as run-loop tuples: (0, s) compute, (1, message, tx, hold, latency) send,
        (2, message, rx) receive."""
        prog, sizes = self.prog, self.sizes
        codes, mids, peers = prog.code[r], prog.mid[r], prog.peer[r]
        link = self.links[r] if self.links is not None and self.fixed else None
        costs = _LinkCosts(link, {(peers[i], sizes[mids[i]]) for i in prog.comm[r]})
        send, receive = costs.send, costs.receive
        ops = [(_COMPUTE, duration(r, a)) if c < 4
               else (_SEND, mid, *send[(peer, sizes[mid])]) if c < 6
               else (_RECV, mid, receive[(peer, sizes[mid])])
               for a, c, mid, peer in zip(prog.sched.actions[r], codes, mids, peers)]
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

"""Compiling a schedule: the player's rules checked once, and the schedule turned into numbers to play.

Rules (the executor follows the same ones, so a schedule that compiles here runs there): each rank runs its
action list in order; a compute action needs its inputs on this rank (the previous stage's forward or a
received activation; the forward and the output gradient for a backward; the input-gradient half for a
weight-gradient half; the computation a send ships) and runs once per step; a receive blocks until its
message has been sent; every message sent is received.

:func:`compile_schedule` checks them without timing -- they do not depend on durations or links -- and
raises :class:`ScheduleError` naming the rank and the action (a stage the rank does not hold, a compute
before its inputs, a receive nothing sends: deadlock, a send nobody receives). A valid schedule comes back
as a :class:`Program`: every action in one order in which each receive follows its send (the order in which
the checks ran them: ranks swept in ascending order, each as far as it goes), for
:class:`lowbw.pipeline.player.Player` to time. :func:`validate_schedule` also checks that every stage runs
the forward and the backward of every microbatch.

Two passes: the rules that concern one rank alone (a compute after its inputs, once) are checked for all of
a rank's actions at once, as arrays (:func:`_rank_local`; ~10^5 actions at 64 stages x 256 microbatches);
only a rank that breaks one is run again action by action (:func:`_first_broken`), to say which and why.
Then :func:`_sweep` runs the sends and receives of all ranks against each other.
"""

from __future__ import annotations

import bisect
from operator import itemgetter

import numpy as np

from lowbw.errors import ScheduleError
from lowbw.pipeline.actions import Action, Kind, Schedule


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


# Action kinds as small integers: computes 0-3 (also their flag slot), sends 4-5, receives 6-7.
_CODE = {Kind.FORWARD: 0, Kind.FULL_BACKWARD: 1, Kind.BACKWARD_INPUT: 2, Kind.BACKWARD_WEIGHT: 3,
         Kind.SEND_F: 4, Kind.SEND_B: 5, Kind.RECV_F: 6, Kind.RECV_B: 7}
# Flags per (stage, microbatch), _SLOTS of them: slots 0-3 "this compute ran", then "the input gradient is
# there" (B or I ran), "the forward / backward message was received", "always" (set before any action: the
# input of what needs none) and "never" (never set: the input of a send to a stage that does not exist).
_GRAD, _GOT_F, _GOT_B, _ALWAYS, _NEVER, _SLOTS = 4, 5, 6, 7, 8, 9
# Why a rank's action fails, found by the rank-local pass; raised when the sweep reaches it: its first
# input is missing (a backward's forward; the only input of the others), a backward's output gradient is.
_NOT_READY, _NO_GRADIENT, _NO_NEIGHBOUR, _TWICE = 1, 2, 3, 4
# "Not set yet" in the first-set positions of _rank_local: after every action of every rank.
_UNSET = np.iinfo(np.int64).max


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


def _rank_arrays(sched: Schedule, r: int) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """Rank r's actions as (codes, then arrays of codes, stages and microbatches); raises for its first action
    on a stage it does not hold or a microbatch out of range."""
    acts, S, M = sched.actions[r], sched.n_stages, sched.n_microbatches
    n = len(acts)
    codes = list(map(_CODE.__getitem__, map(itemgetter(1), acts)))
    stage = np.fromiter(map(itemgetter(0), acts), np.int64, n)
    mb = np.fromiter(map(itemgetter(2), acts), np.int64, n)
    held = np.zeros(S, bool)
    held[sched.stages_of(r)] = True
    if n and not (stage.min() >= 0 and stage.max() < S and held[stage].all() and mb.min() >= 0 and mb.max() < M):
        _check_held(sched, r)
    return codes, np.array(codes, np.int64), stage, mb


def _rule_table(sched: Schedule, r: int) -> np.ndarray:
    """Rank r's rank-local rules, shape (5, 8 codes, stages): for an action of that code on that stage, the
    two flags it needs set, the flag it needs unset (a compute that ran already runs twice) and the two flags
    it sets, each as an offset from the first flag of its own (stage, microbatch). Stages the rank does not
    hold stay 0 (:func:`_rank_arrays` refused them)."""
    S, M, to_rank = sched.n_stages, sched.n_microbatches, sched.stage_to_rank
    row = _SLOTS * M  # from a stage's flags to the next stage's, same microbatch
    table = np.zeros((5, 8, S), np.int64)
    for s in sched.stages_of(r):
        f_in = _ALWAYS if s == 0 else -row if to_rank[s - 1] == r else _GOT_F  # a forward's input
        g_in = _ALWAYS if s == S - 1 else row + _GRAD if to_rank[s + 1] == r else _GOT_B  # a backward's
        table[:, :, s] = np.array([  # per code: needs, needs, needs unset, sets, sets
            (f_in, _ALWAYS, 0, 0, 0),  # F
            (0, g_in, 1, 1, _GRAD),  # B
            (0, g_in, 2, 2, _GRAD),  # I
            (2, _ALWAYS, 3, 3, 3),  # W
            (0, _ALWAYS if s < S - 1 else _NEVER, _NEVER, _ALWAYS, _ALWAYS),  # SEND_F
            (_GRAD, _ALWAYS if s > 0 else _NEVER, _NEVER, _ALWAYS, _ALWAYS),  # SEND_B
            (_ALWAYS, _ALWAYS, _NEVER, _GOT_F, _GOT_F),  # RECV_F
            (_ALWAYS, _ALWAYS, _NEVER, _GOT_B, _GOT_B),  # RECV_B
        ]).T
    return table


def _rank_local(sched: Schedule, r: int, arrays: tuple, first_set: np.ndarray) -> tuple[int, int]:
    """Rank r's first action that breaks a rank-local rule, as (index, why), or (len, 0).

    An action at index i is fine when the flags it needs were set by actions before it and the one it
    needs unset was not: with ``first_set[flag]`` the index of the first of rank r's actions that sets it
    (ranks hold different stages, so they share the array without meeting), that is one comparison per
    flag. Only when some action is not fine does :func:`_first_broken` go through the rank to name it."""
    _, code, stage, mb = arrays
    n, M = len(code), sched.n_microbatches
    flag = _rule_table(sched, r)[:, code, stage] + (stage * M + mb) * _SLOTS  # (5, n): absolute flags
    i = np.arange(n)
    np.minimum.at(first_set, flag[3], i)
    np.minimum.at(first_set, flag[4], i)
    if ((first_set[flag[0]] < i) & (first_set[flag[1]] < i) & (first_set[flag[2]] >= i)).all():
        return n, 0
    return _first_broken(sched, r)


def _first_broken(sched: Schedule, r: int) -> tuple[int, int]:
    """What :func:`_rank_local` finds, action by action: (index, why) of rank r's first action that breaks a
    rank-local rule, or (len, 0)."""
    S, M, to_rank, acts = sched.n_stages, sched.n_microbatches, sched.stage_to_rank, sched.actions[r]
    row, last = _SLOTS * M, S - 1
    have = bytearray(S * M * _SLOTS)
    for i, (s, kind, mb) in enumerate(acts):
        c, f = _CODE[kind], (s * M + mb) * _SLOTS
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
        if why:
            return i, why
    return len(acts), 0


# Per code of a send or receive: (receiving stage - this stage, direction 0 = F / 1 = B) of its message,
# and the other end's stage - this stage.
_MESSAGE = {4: (1, 0), 5: (-1, 1), 6: (0, 0), 7: (0, 1)}
_OTHER_END = {4: 1, 5: -1, 6: -1, 7: 1}


def _messages(sched: Schedule, r: int, arrays: tuple) -> tuple[list, list, list, list]:
    """Rank r's sends and receives: their indices; per action its message number (2 x (receiving stage x
    microbatches + microbatch) + direction) and the rank on the other end, -1 for computes and for a stage
    with no neighbour (such a send breaks the rules before its number is used); and per send or receive, in
    list order, the message number m of a send and ~m (negative) of a receive, for :func:`_sweep`."""
    S, M, to_rank = sched.n_stages, sched.n_microbatches, sched.stage_to_rank
    _, code, stage, mb = arrays
    first = np.full((8, S), -1, np.int64)  # per (code, stage): the message number of microbatch 0
    peer = np.full((8, S), -1, np.int64)
    for s in sched.stages_of(r):
        for c, (d, k) in _MESSAGE.items():
            if 0 <= s + d < S:
                first[c, s] = 2 * (s + d) * M + k
            if 0 <= s + _OTHER_END[c] < S:
                peer[c, s] = to_rank[s + _OTHER_END[c]]
    first = first[code, stage]
    mids = np.where(first >= 0, first + 2 * mb, -1)
    comm = np.flatnonzero(code >= 4)
    signed = np.where(code[comm] >= 6, ~mids[comm], mids[comm])
    return comm.tolist(), mids.tolist(), peer[code, stage].tolist(), signed.tolist()


def _sweep(sched: Schedule, comm: list, signed: list, fails: list, n_messages: int) -> tuple[list, list, bytearray]:
    """Run every rank as far as it goes, ranks in ascending order, until no rank moves; only sends and
    receives matter (computes never block), and a rank's first broken rule raises when it is reached.
    ``comm[r]``, ``signed[r]``: the indices and the signed message numbers of :func:`_messages`.

    Returns (segments run, final position per rank, messages sent and not received)."""
    R = sched.n_ranks
    posted = bytearray(n_messages)
    pc, cpc = [0] * R, [0] * R
    # the sends and receives a rank may run: those before its first broken rule (a send to no stage among them)
    runnable = [bisect.bisect_left(comm[r], fails[r][0]) for r in range(R)]
    segments: list[tuple[int, int, int]] = []
    progressed = True
    while progressed:
        progressed = False
        for r in range(R):
            ops, j, n = signed[r], cpc[r], runnable[r]
            while j < n:
                m = ops[j]
                if m >= 0:  # a send
                    if posted[m]:
                        _raise_sent_twice(sched, r, comm[r][j])
                    posted[m] = 1
                elif posted[~m]:
                    posted[~m] = 0
                else:
                    break  # blocked until some rank sends it
                j += 1
            if j < n:
                end = comm[r][j]
            elif fails[r][1]:  # reached the broken rule
                _raise_broken(sched, r, *fails[r])
            else:
                end = len(sched.actions[r])
            if end > pc[r]:
                segments.append((r, pc[r], end))
                pc[r], cpc[r] = end, j
                progressed = True
    return segments, pc, posted


def _raise_sent_twice(sched: Schedule, rank: int, pos: int) -> None:
    a = sched.actions[rank][pos]
    raise ScheduleError(f"rank {rank} action {a}: sends {message_key(a, sched.n_stages)} to rank "
                        f"{peer_of(a, sched)} twice")


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
    R, n_flags = sched.n_ranks, sched.n_stages * sched.n_microbatches * _SLOTS
    arrays = [_rank_arrays(sched, r) for r in range(R)]  # raises for a stage not held, first
    first_set = np.full(n_flags, _UNSET, np.int64)
    first_set[_ALWAYS::_SLOTS] = -1
    fails = [_rank_local(sched, r, arrays[r], first_set) for r in range(R)]
    codes = [a[0] for a in arrays]
    messages = [_messages(sched, r, arrays[r]) for r in range(R)]
    comm, mids, peers, signed = ([m[k] for m in messages] for k in range(4))
    n_messages = 2 * sched.n_stages * sched.n_microbatches
    segments, pc, posted = _sweep(sched, comm, signed, fails, n_messages)
    _raise_incomplete(sched, mids, segments, pc, posted)
    prog = Program(sched, codes, mids, peers, comm, segments, n_messages)
    prog.ran, prog.snapshot = (first_set != _UNSET).tobytes(), snapshot
    _last_compiled[:] = [prog]
    return prog


def validate_schedule(sched: Schedule) -> Program:
    """Raise ScheduleError unless every rank finishes and every stage runs F and B for every microbatch."""
    prog = compile_schedule(sched)
    ran = prog.ran  # per (stage, microbatch) in order: did F, B, I, W run
    forward, full, inp, weight = (ran[slot::_SLOTS] for slot in range(4))
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

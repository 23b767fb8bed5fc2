"""Run a schedule on a model of the machine: the validator, and the core of timing prediction.

:func:`play` executes every rank's action list in event time -- compute takes ``duration(rank,
action)`` seconds, a message takes what the link model says -- with no tensors and no processes.
It raises :class:`ScheduleError` naming the rank and action when a schedule is malformed (an
action for a stage the rank does not hold, a compute before its inputs, a receive nothing sends:
deadlock, a send nobody receives), and otherwise returns the timeline. The executor that runs
real tensors follows the same rules, so a schedule that plays here runs there.
"""

from __future__ import annotations

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


def peer_of(a: Action, sched: Schedule) -> int:
    """The rank on the other end of a communication action."""
    neighbour = a.stage + 1 if a.kind in (Kind.SEND_F, Kind.RECV_B) else a.stage - 1
    if not 0 <= neighbour < sched.n_stages:
        raise ScheduleError(f"action {a}: stage {a.stage} has no neighbour stage {neighbour}")
    return sched.stage_to_rank[neighbour]


def _check_ready(rank: int, a: Action, done: set, received: set, sched: Schedule) -> None:
    s, mb, last = a.stage, a.microbatch, sched.n_stages - 1

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise ScheduleError(f"rank {rank} action {a}: runs before {what} on this rank")

    if a.kind == Kind.FORWARD and s > 0:
        local = sched.stage_to_rank[s - 1] == rank
        need((Kind.FORWARD, s - 1, mb) in done if local else ("F", s, mb) in received, f"its input ({s}RECV_F{mb})")
    elif a.kind in (Kind.FULL_BACKWARD, Kind.BACKWARD_INPUT):
        need((Kind.FORWARD, s, mb) in done, f"{s}F{mb}")
        if s < last:
            local = sched.stage_to_rank[s + 1] == rank
            grad_done = (Kind.FULL_BACKWARD, s + 1, mb) in done or (Kind.BACKWARD_INPUT, s + 1, mb) in done
            need(grad_done if local else ("B", s, mb) in received, f"its output gradient ({s}RECV_B{mb})")
    elif a.kind == Kind.BACKWARD_WEIGHT:
        need((Kind.BACKWARD_INPUT, s, mb) in done, f"{s}I{mb}")
    elif a.kind == Kind.SEND_F:
        need((Kind.FORWARD, s, mb) in done, f"{s}F{mb}")
    elif a.kind == Kind.SEND_B:
        need((Kind.FULL_BACKWARD, s, mb) in done or (Kind.BACKWARD_INPUT, s, mb) in done, f"{s}B{mb} or {s}I{mb}")


def play(
    sched: Schedule,
    duration: Callable[[int, Action], float] = lambda r, a: 1.0,
    nbytes: Callable[[Action], int] = lambda a: 0,
    links: Optional[dict[int, LinkModel]] = None,
    start: Optional[dict[int, float]] = None,
    step: int = 0,
    timeline: Optional[Timeline] = None,
) -> Timeline:
    """Play one step of ``sched``; ``links[r]`` charges rank r's sends and receives (None: free links)."""
    R, S, M = sched.n_ranks, sched.n_stages, sched.n_microbatches
    tl = timeline if timeline is not None else Timeline("virtual", R)
    clock = {r: (start or {}).get(r, 0.0) for r in range(R)}
    pc = {r: 0 for r in range(R)}
    done: dict[int, set] = {r: set() for r in range(R)}
    received: dict[int, set] = {r: set() for r in range(R)}
    mailbox: dict[tuple[int, tuple], tuple[float, int, int, Action]] = {}  # (dst, key) -> (arrival, bytes, src, send)

    for r in range(R):
        for a in sched.actions[r]:
            if not 0 <= a.stage < S or sched.stage_to_rank[a.stage] != r:
                raise ScheduleError(f"rank {r} action {a}: stage {a.stage} is not held by rank {r}")
            if not 0 <= a.microbatch < M:
                raise ScheduleError(f"rank {r} action {a}: microbatch {a.microbatch} outside 0..{M - 1}")

    progressed = True
    while progressed:
        progressed = False
        for r in range(R):
            acts = sched.actions[r]
            while pc[r] < len(acts):
                a = acts[pc[r]]
                if a.kind in (Kind.RECV_F, Kind.RECV_B):
                    key = message_key(a, S)
                    msg = mailbox.pop((r, key), None)
                    if msg is None:
                        break  # blocked until some rank sends it
                    arrival, size, src, _ = msg
                    t0 = clock[r]
                    delivery = links[r].deliver(src, size, arrival) if links else arrival
                    clock[r] = max(t0, delivery)
                    tl.add(Event(r, "recv_wait", t0, clock[r], step, str(a), 0, src))
                    received[r].add(key)
                else:
                    _check_ready(r, a, done[r], received[r], sched)
                    if a.kind in (Kind.SEND_F, Kind.SEND_B):
                        dst = peer_of(a, sched)
                        key = message_key(a, S)
                        if (dst, key) in mailbox:
                            raise ScheduleError(f"rank {r} action {a}: sends {key} to rank {dst} twice")
                        size = nbytes(a)
                        arrival = links[r].send(dst, size, clock[r]).arrival if links else clock[r]
                        mailbox[(dst, key)] = (arrival, size, r, a)
                        tl.add(Event(r, "send", clock[r], clock[r], step, str(a), size, dst))
                    else:
                        ident = (a.kind, a.stage, a.microbatch)
                        if ident in done[r]:
                            raise ScheduleError(f"rank {r} action {a}: runs twice in one step")
                        t0 = clock[r]
                        clock[r] += duration(r, a)
                        tl.add(Event(r, _COMPUTE_EVENT[a.kind], t0, clock[r], step, str(a)))
                        done[r].add(ident)
                pc[r] += 1
                progressed = True

    stuck = [r for r in range(R) if pc[r] < len(sched.actions[r])]
    if stuck:
        where = "; ".join(
            f"rank {r} waits at {sched.actions[r][pc[r]]} for a message "
            f"{'that a blocked rank has not sent yet' if _is_sent_later(sched, r, pc[r]) else 'no rank sends'}"
            for r in stuck
        )
        raise ScheduleError(f"schedule {sched.name!r} deadlocks: {where}")
    if mailbox:
        (dst, key), (_, _, src, a) = next(iter(mailbox.items()))
        raise ScheduleError(f"rank {src} action {a}: sends {key} to rank {dst}, which never receives it")
    return tl


def _is_sent_later(sched: Schedule, rank: int, pos: int) -> bool:
    key = message_key(sched.actions[rank][pos], sched.n_stages)
    return any(
        a.kind in (Kind.SEND_F, Kind.SEND_B) and peer_of(a, sched) == rank and message_key(a, sched.n_stages) == key
        for acts in sched.actions.values()
        for a in acts
    )


def validate_schedule(sched: Schedule) -> None:
    """Raise ScheduleError unless every rank finishes and every stage runs F and B for every microbatch."""
    play(sched)
    S, M = sched.n_stages, sched.n_microbatches
    for s in range(S):
        r = sched.stage_to_rank[s]
        kinds = {(a.kind, a.microbatch) for a in sched.actions[r] if a.stage == s}
        for mb in range(M):
            if (Kind.FORWARD, mb) not in kinds:
                raise ScheduleError(f"rank {r}: stage {s} never runs the forward of microbatch {mb} ({s}F{mb})")
            full = (Kind.FULL_BACKWARD, mb) in kinds
            split = (Kind.BACKWARD_INPUT, mb) in kinds and (Kind.BACKWARD_WEIGHT, mb) in kinds
            if not (full or split) and sched.name != "forward_only":
                raise ScheduleError(f"rank {r}: stage {s} never runs the backward of microbatch {mb} ({s}B{mb})")

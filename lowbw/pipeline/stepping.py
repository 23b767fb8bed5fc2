"""Step after step: a compiled schedule played for a number of optimizer steps, as a run plays them.

Each rank starts a step when it ends the previous one (its optimizer step included), and the link
queues carry over, so that consecutive steps overlap as they do in a run. Per step: its time (the
latest rank's end minus the previous step's), bubble fraction, bytes and messages.

Steady state: when every step has the same durations and every message a fixed cost (no jitter, no
outage, no bandwidth trace), the steps are played until one repeats the one before it shifted in time;
that step stands for all the later ones, which are extrapolated rather than played (:func:`_repeats`
proves why this gives what playing them would). ``Steps.played`` says how many were played.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

from lowbw.metrics.timeline import Event
from lowbw.net.link import LinkModel
from lowbw.pipeline.player import Player, Program


@dataclass
class Steps:
    """What the steps gave: one row per step, busy seconds per rank over the measured steps, events."""

    rows: list[dict]  # step, step_time_s, bubble_fraction, bytes_sent, messages, link_bytes {(src, dst): bytes}
    busy_measured: list[float]  # s per rank, summed over the measured steps
    events: list[Event]  # of the recorded steps
    played: int  # steps played; the rows after them repeat the last one played


def _state_of(prog: Program, links: Optional[dict[int, LinkModel]]) -> Callable[[list[float]], list[float]]:
    """What carries from one step into the next, given each rank's start: those starts, and the free times
    of the uplinks and downlinks the schedule uses (a pair's FIFO memory never binds without jitter:
    ``lowbw.pipeline.player._LinkCosts``)."""
    R = prog.sched.n_ranks
    sends = [r for r in range(R) if any(4 <= c < 6 for c in prog.code[r])]
    receives = [r for r in range(R) if any(c >= 6 for c in prog.code[r])]

    def state(start: list[float]) -> list[float]:
        if links is None:
            return list(start)
        return list(start) + [links[r].uplink_free for r in sends] + [links[r].downlink_free for r in receives]
    return state


def _repeats(before: list[float], after: list[float], step_time: float) -> bool:
    """Whether a step left the state as it found it, shifted by its step time (to 1e-12 of it).

    Why every later step then takes the same time: with the same durations and link costs every step,
    a step maps the state X -- each rank's start time, each used uplink's and downlink's free time -- to
    the next by sums and maxima of X's entries and the step's constants, nothing else. Such a map F
    commutes with shifts, F(X + c) = F(X) + c, and brings states no further apart, |F(X) - F(Y)| <= |X - Y|
    (max norm). If X' = F(X) = X + T + e with |e| <= tol, the next step's X'' - X' - T = F(X') - F(X + T)
    has |.| <= |X' - X - T| = |e| <= tol, and so on: every later step ends within tol of T after the
    previous one, and its busy time and bytes are the same. tol = 1e-12 T, far inside the 1e-9 that
    tests/test_simulate_golden.py holds the simulator's numbers to.
    """
    tol = 1e-12 * abs(step_time)
    return step_time > 0 and all(abs(b - a - step_time) <= tol for a, b in zip(before, after))


def play_steps(prog: Program, player: Union[Player, Callable[[int], Player]], n_steps: int,
               measured: Sequence[bool], record: frozenset[int] = frozenset(),
               optimizer_s: Optional[dict[tuple[int, int], float]] = None, extrapolate: bool = True) -> Steps:
    """Play ``n_steps`` steps (or until one repeats the one before it, then extrapolate the rest).

    ``player``: the Player of every step, or ``player(step)`` when durations change from step to step
    (then every step is played). ``measured[step]``: whether the step's busy time counts.
    ``record``: steps whose events are kept. ``optimizer_s[(step, rank)]``: s the optimizer step adds to
    the rank's step (recorded runs; none: 0, as under planned durations).
    """
    opt = optimizer_s or {}
    fixed = player if isinstance(player, Player) else None
    steady = extrapolate and fixed is not None and fixed.fixed and not opt
    p = prog.sched.n_ranks
    state = _state_of(prog, fixed.links if fixed is not None else None)
    start, t_prev = [0.0] * p, 0.0
    out = Steps([], [0.0] * p, [], 0)
    for step in range(n_steps):
        before = state(start) if steady else []
        res = (fixed or player(step)).play(dict(enumerate(start)), step, record=step in record)
        out.events += res.events
        end, busy = res.end, res.busy
        for r in range(p):  # the optimizer step ends the rank's step
            o = opt.get((step, r), 0.0)
            if o and step in record:
                out.events.append(Event(r, "optimizer", end[r], end[r] + o, step, "optimizer"))
            end[r] += o
            busy[r] += o
        start, t_end = end, max(end)
        row = {"step": step, "step_time_s": t_end - t_prev, "bytes_sent": sum(res.link_bytes.values()),
               "bubble_fraction": 1.0 - sum(busy) / (p * (t_end - t_prev)) if t_end > t_prev else 0.0,
               "messages": res.messages, "link_bytes": res.link_bytes}
        t_prev = t_end
        out.played += 1
        repeats = steady and step >= max(record, default=-1) and _repeats(before, state(start), row["step_time_s"])
        for j in range(step, n_steps if repeats else step + 1):  # a repeating step stands for all the rest
            out.rows.append({**row, "step": j})
            if measured[j]:
                out.busy_measured = [a + b for a, b in zip(out.busy_measured, busy)]
        if repeats:
            break
    return out

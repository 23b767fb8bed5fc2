"""How many forwards' activations a rank holds at its peak under a schedule: what the schedule papers
compare as activation memory (GPipe: every microbatch; 1F1B: at most the stages after it; ZB-V and
DualPipeV in chunks). The tests hold lowbw's generators to those figures."""

from __future__ import annotations

from lowbw.pipeline.actions import Kind, Schedule


def in_flight(sched: Schedule, rank: int) -> int:
    """Peak number of (stage, microbatch) pairs whose activations ``rank`` holds: forward done, weight
    gradient (``W``, or the full backward ``B``) not yet."""
    live, peak = set(), 0
    for a in sched.actions[rank]:
        if a.kind == Kind.FORWARD:
            live.add((a.stage, a.microbatch))
        elif a.kind in (Kind.FULL_BACKWARD, Kind.BACKWARD_WEIGHT):
            live.discard((a.stage, a.microbatch))
        peak = max(peak, len(live))
    return peak

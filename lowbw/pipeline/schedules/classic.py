"""The two flush schedules every pipeline paper starts from, and the forward-only schedule of evaluation."""

from __future__ import annotations

from lowbw.pipeline.actions import Action, Kind, Rows, Schedule, add_communication
from lowbw.pipeline.schedules.registry import register_schedule


@register_schedule("gpipe")
def gpipe(p: int, m: int) -> tuple[Rows, tuple[int, ...]]:
    """GPipe (Huang et al. 2019): all forwards, then all backwards; m microbatches of activations held."""
    rows = {r: [Action(r, Kind.FORWARD, i) for i in range(m)] + [Action(r, Kind.FULL_BACKWARD, i) for i in range(m)]
            for r in range(p)}
    return rows, tuple(range(p))


@register_schedule("1f1b")
def one_f_one_b(p: int, m: int) -> tuple[Rows, tuple[int, ...]]:
    """1F1B / PipeDream-flush (Narayanan et al. 2021): warm up with p-1-r forwards, then alternate.

    Same bubble as GPipe, (p-1)/(m+p-1), but stage r holds at most p-r microbatches of activations.
    """
    rows: Rows = {}
    for r in range(p):
        warmup = min(m, p - 1 - r)
        acts = [Action(r, Kind.FORWARD, i) for i in range(warmup)]
        for i in range(m - warmup):
            acts.append(Action(r, Kind.FORWARD, warmup + i))
            acts.append(Action(r, Kind.FULL_BACKWARD, i))
        acts += [Action(r, Kind.FULL_BACKWARD, i) for i in range(m - warmup, m)]
        rows[r] = acts
    return rows, tuple(range(p))


def forward_only(p: int, m: int, stage_to_rank: tuple[int, ...] | None = None) -> Schedule:
    """Evaluation: forwards only, no gradients; p stages placed as the training schedule places them."""
    stage_to_rank = tuple(stage_to_rank) if stage_to_rank is not None else tuple(range(p))
    rows = {r: [Action(s, Kind.FORWARD, i) for s in range(p) if stage_to_rank[s] == r for i in range(m)]
            for r in range(1 + max(stage_to_rank))}
    return Schedule("forward_only", p, m, stage_to_rank, add_communication(rows, stage_to_rank))

"""Planned compute durations: what an action costs on the virtual clock when it is not measured.

A stage's forward and full backward of one microbatch take ``forward_s`` and ``backward_s``
(from FLOPs and a hardware profile, or fixed). Zero-bubble schedules split the backward into ``I``
(input gradient) and ``W`` (weight gradient); each is charged half of the full backward. Why
halves: every linear layer's backward is two matmuls of the forward's size, ``dX = dY W^T`` (I)
and ``dW = X^T dY`` (W); attention's score gradients belong to I alone, so this slightly
undercharges I for long contexts -- the same equal-split assumption Qi et al. 2024 ("Zero Bubble
Pipeline Parallelism", arXiv 2401.10241, Sec. 2) use for their T_B = T_W analysis.
"""

from __future__ import annotations

from typing import Callable, Optional

from lowbw.pipeline.actions import Action, Kind

#: Fraction of a stage's full backward each compute kind costs (forward has its own figure).
BACKWARD_SHARE = {Kind.FULL_BACKWARD: 1.0, Kind.BACKWARD_INPUT: 0.5, Kind.BACKWARD_WEIGHT: 0.5}


def action_seconds(kind: Kind, forward_s: float, backward_s: float) -> float:
    """Seconds of one compute action of kind ``kind`` for a stage with these forward / full-backward times."""
    if kind == Kind.FORWARD:
        return forward_s
    return backward_s * BACKWARD_SHARE[kind]


def planner(stage_seconds: Optional[dict[int, tuple[float, float]]]) -> Callable[[Action], Optional[float]]:
    """The executor's planned duration of an action: None (measure it) when ``stage_seconds`` is None, else
    the stage's (forward_s, backward_s) split by :func:`action_seconds` for compute and 0 s for codec work."""
    if stage_seconds is None:
        return lambda a: None
    return lambda a: action_seconds(a.kind, *stage_seconds[a.stage]) if a.kind in _COMPUTE else 0.0


_COMPUTE = frozenset({Kind.FORWARD, *BACKWARD_SHARE})

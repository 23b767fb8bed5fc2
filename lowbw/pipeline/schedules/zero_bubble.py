"""ZB-H1 (Qi et al. 2024, "Zero Bubble Pipeline Parallelism", arXiv 2401.10241, Fig. 3).

The backward of a stage is split in two: ``I`` (gradient w.r.t. the stage input, "B" in the paper)
which the previous stage waits for, and ``W`` (gradient w.r.t. the weights), which nobody waits
for. The input gradient therefore travels back one stage per T_B instead of per T_B + T_W, and the
W passes are pushed later to fill what would have been the cool-down bubble.

Order on rank r of p (m microbatches): 1F1B's warm-up of p-1-r forwards; then steady state
``F, I`` with rank r holding back its first r weight passes (``W`` lags ``I`` by r microbatches);
then cool-down ``I, W`` pairs; then the r deferred W passes. The last rank defers the most, so its
last input gradient leaves p-1 W-passes early, and every rank finishes together. Bubble per rank:
(p-1)(T_F + T_B - T_W), a third of 1F1B's (p-1)(T_F + T_B + T_W) when T_F = T_B = T_W. Peak
activations in flight: p-1-r+1+r = p microbatches on every rank, 1F1B's worst (rank 0) -- the
"H1" memory budget of the paper.
"""

from __future__ import annotations

from lowbw.pipeline.actions import Action, Kind
from lowbw.pipeline.actions import Rows
from lowbw.pipeline.schedules.registry import register_schedule


def zb_h1_rank_order(p: int, m: int, rank: int) -> list[Action]:
    s = rank
    warmup = min(m, p - 1 - rank)
    lag = rank
    acts = [Action(s, Kind.FORWARD, i) for i in range(warmup)]
    w_next = 0

    def maybe_w(done_i: int) -> None:  # run the oldest pending W once more than `lag` are pending
        nonlocal w_next
        if done_i - w_next > lag:
            acts.append(Action(s, Kind.BACKWARD_WEIGHT, w_next))
            w_next += 1

    i_next = 0
    for k in range(m - warmup):  # steady: F, I, and W lagging by `lag`
        acts.append(Action(s, Kind.FORWARD, warmup + k))
        acts.append(Action(s, Kind.BACKWARD_INPUT, i_next))
        i_next += 1
        maybe_w(i_next)
    while i_next < m:  # cool-down: I, W
        acts.append(Action(s, Kind.BACKWARD_INPUT, i_next))
        i_next += 1
        maybe_w(i_next)
    acts += [Action(s, Kind.BACKWARD_WEIGHT, w) for w in range(w_next, m)]
    return acts


@register_schedule("zb_h1")
def zb_h1(p: int, m: int) -> tuple[Rows, tuple[int, ...]]:
    """ZB-H1: split backward (I then W), W deferred into the cool-down bubble; one stage per rank."""
    return {r: zb_h1_rank_order(p, m, r) for r in range(p)}, tuple(range(p))

"""V-shaped schedules: each of the p ranks holds two model chunks, stage r and stage 2p-1-r.

A microbatch goes down the ranks through the first chunks (stages 0..p-1), turns on the last rank
(stages p-1 and p are both there: the hand-over is in memory) and comes back up through the second
chunks (stages p..2p-1). Twice the point-to-point messages of 1F1B per microbatch, but every rank
holds the first and the last layers' share alike, so memory and work are balanced.

- ``zbv``: ZB-V (Qi et al. 2024, "Zero Bubble Pipeline Parallelism", arXiv 2401.10241, Sec. 6; the
  order of torch.distributed.pipelining's ``ScheduleZBVZeroBubble``): split backward (I, then W),
  with the W passes filling the warm-up and cool-down. The authors' comparison at T_F = T_B = T_W
  (forward, input-gradient and weight-gradient time of one chunk): no bubble in the steady state,
  the activation memory of 1F1B, twice its pipeline traffic.
- ``dualpipev``: DualPipeV (the V-shaped, half-device variant of DualPipe, DeepSeek-V3 technical
  report, arXiv 2412.19437, Sec. 3.2.1 and Table 2; the order of torch's ``ScheduleDualPipeV``):
  in its main phase each rank runs a forward of one chunk paired with a full backward of the other
  (torch's ``OVERLAP_F_B`` action, run as its two parts in order -- lowbw's sends never hold up
  compute, which is the overlap DualPipe is after), and the last microbatches' backwards split
  into I and W to fill the cool-down. Bubble (PP/2 - 1)(F&B + B - 3W) for PP = 2p chunks, F&B the
  time of one overlapped pair; needs m >= 2p microbatches.

Both generators return compute-only rows; lowering and validation are build_schedule's.
"""

from __future__ import annotations

from lowbw.errors import ConfigError
from lowbw.pipeline.actions import Action, Kind, Overlap, Rows
from lowbw.pipeline.schedules.registry import register_schedule

F, I, W, B = Kind.FORWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT, Kind.FULL_BACKWARD


def v_placement(p: int) -> tuple[int, ...]:
    """Rank of each of the 2p stages: stage s on rank s going down, on rank 2p-1-s coming back."""
    return tuple(s if s < p else 2 * p - 1 - s for s in range(2 * p))


class _Counters:
    """Next microbatch of each (stage, kind) on one rank, and the rank's action list."""

    def __init__(self) -> None:
        self.acts: list[Action] = []
        self.next: dict[tuple[int, Kind], int] = {}

    def add(self, stage: int, kind: Kind) -> int:
        mb = self.next.get((stage, kind), 0)
        self.next[(stage, kind)] = mb + 1
        self.acts.append(Action(stage, kind, mb))
        return mb

    def count(self, stage: int, kind: Kind) -> int:
        return self.next.get((stage, kind), 0)


def zbv_rank_order(p: int, m: int, rank: int) -> list[Action]:
    """ZB-V on one rank: warm-up forwards, steady F-I-W of both chunks, cool-down I then W passes.

    The pattern is laid out for max(m, 2p-1) microbatches (the fewest that fill the V) and the
    actions of microbatches >= m are then dropped, as torch does."""
    n = max(m, 2 * p - 1)
    down, up = rank, 2 * p - 1 - rank
    c = _Counters()
    for _ in range(2 * (p - rank) - 1):  # first chunk only, until the V has reached this rank's turn
        c.add(down, F)
    for _ in range(rank):
        c.add(up, F)
        c.add(down, F)
    for _ in range(p - rank):  # the second chunk starts its backwards at once
        c.add(up, F)
        c.add(up, I)
        c.add(up, W)
    while c.count(up, F) < c.count(down, F) or c.count(down, F) < n:  # steady state
        if c.count(down, F) < n:
            c.add(down, F)
        c.add(down, I)
        c.add(down, W)
        c.add(up, F)
        c.add(up, I)
        c.add(up, W)
    for _ in range(rank):  # cool-down: input gradients first, weight gradients fill in behind
        c.add(down, I)
        c.add(up, I)
    for _ in range(p - rank):
        c.add(down, I)
        c.add(down, W)
    while c.count(up, W) < c.count(up, I):
        c.add(up, W)
    while c.count(down, W) < c.count(down, I):
        c.add(down, W)
    return [a for a in c.acts if a.microbatch < m]


@register_schedule("zbv")
def zbv(p: int, m: int) -> tuple[Rows, tuple[int, ...]]:
    """ZB-V: two chunks per rank in a V, split backward; 2p stages."""
    return {r: zbv_rank_order(p, m, r) for r in range(p)}, v_placement(p)


class _DualPipeRank(_Counters):
    """One rank of DualPipeV: a full backward counts as both halves; an I queues its W."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.pending_w: list[tuple[int, int]] = []
        self.overlaps: list[Overlap] = []

    def backward(self, stage: int, split: bool) -> None:
        mb = self.count(stage, I)
        self.next[(stage, I)] = mb + 1
        if split:
            self.acts.append(Action(stage, I, mb))
            self.pending_w.append((stage, mb))
        else:
            self.acts.append(Action(stage, B, mb))
            self.next[(stage, W)] = self.count(stage, W) + 1

    def weight(self) -> None:
        if self.pending_w:
            stage, mb = self.pending_w.pop(0)
            self.acts.append(Action(stage, W, mb))

    def overlap(self, forward_stage: int, backward_stage: int) -> None:
        """torch's OVERLAP_F_B: a forward of one chunk and a full backward of the other, as one unit."""
        self.add(forward_stage, F)
        self.backward(backward_stage, split=False)
        self.overlaps.append((self.rank, self.acts[-2], self.acts[-1]))


def dualpipev_rank_order(p: int, m: int, rank: int) -> tuple[list[Action], list[Overlap]]:
    """DualPipeV on one rank (p ranks, 2p chunks, m >= 2p microbatches), in eight phases: the rank's
    actions and its overlapped pairs."""
    down, up = rank, 2 * p - 1 - rank
    c = _DualPipeRank(rank)
    for _ in range(2 * (p - rank - 1)):  # 1: forwards of the first chunk
        c.add(down, F)
    for _ in range(rank + 1):  # 2: both chunks forward
        c.add(down, F)
        c.add(up, F)
    for _ in range(p - rank - 1):  # 3: second chunk, zero-bubble style
        c.backward(up, split=True)
        c.weight()
        c.add(up, F)
    for k in range(m - 2 * p + rank + 1):  # 4: main phase, forward of one chunk with backward of the other
        if k == 0 and rank == p - 1:  # the turn of the V: not overlapped, to shorten the bubble
            c.add(down, F)
            c.backward(up, split=False)
        else:
            c.overlap(down, up)
        c.overlap(up, down)
    for _ in range(p - rank - 1):  # 5
        c.backward(up, split=False)
        c.overlap(up, down)
    split = False
    for k in range(rank + 1):  # 6: both chunks backward; the second half of them split into I and W
        if k == (rank + 1) // 2 and rank % 2 == 1:
            split = True
        c.backward(up, split)
        if k == (rank + 1) // 2 and rank % 2 == 0:
            split = True
        c.backward(down, split)
    for _ in range(p - rank - 1):  # 7
        c.weight()
        c.backward(down, split)
    for _ in range(rank + 1):  # 8: the weight gradients still pending
        c.weight()
    return c.acts, c.overlaps


@register_schedule("dualpipev")
def dualpipev(p: int, m: int) -> tuple[Rows, tuple[int, ...], frozenset[Overlap]]:
    """DualPipeV: two chunks per rank in a V, paired forward/backward in the main phase; needs m >= 2p."""
    if m < 2 * p:
        raise ConfigError(
            f"schedule=dualpipev needs pipeline.microbatches >= 2 x pipeline.stages (one per model chunk): "
            f"microbatches={m}, stages={p}; use pipeline.microbatches={2 * p} or more"
        )
    orders = {r: dualpipev_rank_order(p, m, r) for r in range(p)}
    return {r: acts for r, (acts, _) in orders.items()}, v_placement(p), frozenset(o for _, ov in orders.values() for o in ov)

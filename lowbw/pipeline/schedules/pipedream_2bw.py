"""PipeDream-2BW (Narayanan et al. 2021, "Memory-Efficient Pipeline-Parallel DNN Training", arXiv 2006.09503).

An asynchronous schedule that never flushes: every rank runs 1F1B's steady state straight across
optimizer steps, so the pipeline fills once, at the start of training, and drains once, at the end.

Steps, batches, versions. Step t forwards the m microbatches of batch t. On rank r (warm-up
w_r = p-1-r forwards) the 1F1B order "F(k + w_r), B(k)" runs over global microbatch numbers, so
step t's actions are F(tm+i), B(tm+i-w_r) for i = 0..m-1: the first w_r backwards of step t
belong to batch t-1, whose forwards ran in step t-1 -- they are *in flight* across the step
boundary (activations, autograd graphs and, for one message per boundary, the output gradient
itself travel from step t-1 into step t).

Weight stashing: at the start of step t every stage snapshots its weights as *version t* and every
forward of batch t, on every stage, runs on version t (``torch.func.functional_call``); the
microbatch's backward goes through the graph its forward built, so it uses -- and accumulates its
gradient into -- the same version, even though newer weights exist by then. At most two versions
are alive (t-1 until its in-flight backwards finish early in step t, and t), plus the optimizer's
own copy of the parameters, which nothing reads during a step.

Delayed update (the paper's W(t+1) = W(t) - lr * grad f(W(t-1))): the gradient of batch t-1 is
complete on a rank after its last in-flight backward in step t; the optimizer step at the end of
step t applies it to the live weights, which become version t+1. Staleness: the gradient applied
to version t was computed on version t-1, a delay of exactly one version, whatever the pipeline
depth (PipeDream without 2BW: up to p-1). Step 0 applies nothing (no batch -1). The last step
drains the pipeline (its in-flight backwards run), and the last batch's gradient is not applied.

As a schedule: the registered generator returns an :class:`AsyncSchedule`, whose ``actions`` are
1F1B over *two* batches (microbatches 0..m-1 of batch w, m..2m-1 of batch w+1), lowered and
validated like any schedule. Step 0 runs the window's head (everything before F(m) on each rank);
step t >= 1 runs its steady part (from F(m) up to the drain) with w = t-1; the last step also runs
the drain. Messages are tagged with the batch, not the step, so a message sent at the end of step
t-1 and received at the start of step t matches. Needs m >= p (the paper's m >= d), so that a
batch's gradient is complete one step later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lowbw.errors import ConfigError
from lowbw.pipeline.actions import Action, Kind, Schedule, add_communication
from lowbw.pipeline.schedules.classic import one_f_one_b
from lowbw.pipeline.schedules.registry import register_schedule
from lowbw.pipeline.program import validate_schedule


@dataclass(frozen=True)
class AsyncSchedule(Schedule):
    """A schedule whose steps overlap: ``actions`` spans two batches (microbatches 0..2m-1).

    ``n_microbatches`` is m, the microbatches of one step; :meth:`step_actions` gives a rank's
    actions of one step with each action's microbatch mapped to (batch, microbatch of the batch).
    """

    asynchronous: ClassVar[bool] = True  # the executor keeps state across steps (lowbw.pipeline.weight_stash)

    def window(self) -> Schedule:
        """The two-batch window as an ordinary schedule (what the validator plays)."""
        return Schedule(self.name, self.n_stages, 2 * self.n_microbatches, self.stage_to_rank, self.actions)

    def step_actions(self, rank: int, step: int, last: bool) -> list[tuple[Action, int, int]]:
        """(action, batch, microbatch within the batch) of rank's step ``step``; ``last``: add the drain."""
        m, acts = self.n_microbatches, self.actions[rank]
        warmup = self.n_stages - 1 - rank  # 1F1B's warm-up forwards on this rank (one stage per rank)
        # head: F(0..m-1), B(0..m-1-warmup) -- everything before F(m) (or its receive)
        head_end = next(i for i, a in enumerate(acts) if a.microbatch >= m)
        # drain: B(2m-warmup..2m-1), from the first of them (or its receive) to the end
        drain = next((i for i, a in enumerate(acts)
                      if a.kind in (Kind.RECV_B, Kind.FULL_BACKWARD) and a.microbatch >= 2 * m - warmup), len(acts))
        if step == 0:
            part, w = list(acts[:head_end]), 0
            if last:  # a one-step run is plain 1F1B over m: the head, then batch 0's drain
                part += [Action(a.stage, a.kind, a.microbatch - m) for a in acts[drain:]]
        else:
            part, w = list(acts[head_end:] if last else acts[head_end:drain]), step - 1
        return [(a, w + a.microbatch // m, a.microbatch % m) for a in part]

    def unrolled(self, steps: int) -> Schedule:
        """``steps`` consecutive steps as one schedule over steps*m microbatches (global numbering b*m+i).

        What the executor runs, step after step, rank by rank; it plays in the validator, and it is
        exactly 1F1B over steps*m microbatches: one fill, one drain, no flush in between."""
        m = self.n_microbatches
        rows = {r: [Action(a.stage, a.kind, b * m + i) for t in range(steps)
                    for a, b, i in self.step_actions(r, t, t == steps - 1)] for r in self.actions}
        return Schedule(self.name, self.n_stages, steps * m, self.stage_to_rank, rows)


@register_schedule("pipedream_2bw")
def pipedream_2bw(p: int, m: int) -> AsyncSchedule:
    """PipeDream-2BW: 1F1B across step boundaries, two weight versions, gradients one step late."""
    if m < p:
        raise ConfigError(
            f"schedule=pipedream_2bw needs pipeline.microbatches >= pipeline.stages (a batch's gradient must be "
            f"complete one step later): microbatches={m}, stages={p}; use pipeline.microbatches={p} or more"
        )
    rows, stage_to_rank = one_f_one_b(p, 2 * m)
    sched = AsyncSchedule("pipedream_2bw", p, m, stage_to_rank, add_communication(rows, stage_to_rank))
    validate_schedule(sched.window())
    return sched

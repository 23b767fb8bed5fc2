"""Interleaved 1F1B (Narayanan et al. 2021, arXiv 2104.04473, Megatron-LM "virtual pipeline").

Each of the p ranks holds v model chunks ("virtual stages"): the model is cut into p*v stages and
stage s runs on rank s % p, so a microbatch travels around the ring of ranks v times. Warm-up and
cool-down shrink by a factor v: the bubble is (p-1)/(v*m + p-1) of the step with equal stage times
(against (p-1)/(m+p-1) for 1F1B), at the price of v times more point-to-point messages per
microbatch -- on slow links each extra boundary pays latency and bytes again.

The order is Megatron's (and torch.distributed.pipelining's ``ScheduleInterleaved1F1B`` for
m % p == 0): microbatches go in rounds of p; rank r warms up with (v-1)*p + 2*(p-1-r) forwards,
then alternates one forward and one backward, then drains the backwards. Forwards visit chunks
0..v-1 a round at a time ("depth first"), backwards visit them in reverse.
"""

from __future__ import annotations

from lowbw.errors import ConfigError
from lowbw.pipeline.actions import Action, Kind
from lowbw.pipeline.actions import Rows
from lowbw.pipeline.schedules.registry import register_schedule


def _check(p: int, m: int, v: int) -> None:
    if v < 1:
        raise ConfigError(f"schedule.virtual_stages={v} must be >= 1 (model chunks per rank)")
    if m % p:
        raise ConfigError(
            f"schedule=interleaved_1f1b needs pipeline.microbatches divisible by pipeline.stages (Megatron-LM's "
            f"rule): microbatches={m}, stages={p}; use e.g. pipeline.microbatches={max(p, m - m % p)}"
        )


def interleaved_rank_order(p: int, m: int, v: int, rank: int, split_backward: bool = False) -> list[Action]:
    """Compute actions of one rank (backwards as I + W pairs when ``split_backward``)."""
    total = m * v
    warmup = min((v - 1) * p + 2 * (p - 1 - rank), total)

    def fwd(k: int) -> Action:
        chunk = (k // p) % v
        mb = (k // (p * v)) * p + k % p
        return Action(chunk * p + rank, Kind.FORWARD, mb)

    def bwd(k: int) -> list[Action]:
        chunk = v - 1 - (k // p) % v
        mb = (k // (p * v)) * p + k % p
        s = chunk * p + rank
        if split_backward:
            return [Action(s, Kind.BACKWARD_INPUT, mb), Action(s, Kind.BACKWARD_WEIGHT, mb)]
        return [Action(s, Kind.FULL_BACKWARD, mb)]

    acts = [fwd(k) for k in range(warmup)]
    for k in range(total - warmup):
        acts.append(fwd(warmup + k))
        acts += bwd(k)
    for k in range(total - warmup, total):
        acts += bwd(k)
    return acts


@register_schedule("interleaved_1f1b")
def interleaved_1f1b(p: int, m: int, virtual_stages: int = 2) -> tuple[Rows, tuple[int, ...]]:
    """Interleaved 1F1B with ``virtual_stages`` chunks per rank; p*v stages, stage s on rank s % p."""
    v = int(virtual_stages)
    _check(p, m, v)
    rows = {r: interleaved_rank_order(p, m, v, r) for r in range(p)}
    return rows, tuple(s % p for s in range(p * v))

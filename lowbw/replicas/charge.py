"""The parameters a replica group averages, as shapes: for a run under a regime, and for lowbw-simulate.

A regime's virtual clock (lowbw/regime.py) charges each pipeline message what the target model's
message would take after the same codec. The replicas' messages get the same treatment, exactly: a
group's exchange is the method's :class:`~lowbw.replicas.collective.Exchange` for the *target's*
parameters held by that pipeline rank (at a step where the method sends), and every hop of the run's
collective is charged that hop of the target's -- the chunks lowbw-simulate plays for the target, so
a regime run and the simulator of its target give the same step times (tests/test_replicas.py).

The target is cut into stages as the regime cuts it for its FLOPs (:func:`lowbw.models.flops.stage_blocks`:
whole blocks as evenly as they go, or equal fractions of the blocks when there are more stages than
blocks); a fractional stage is its fraction of a block plus the embedding on the first and the head on
the last. Shapes come from the model code itself, built on PyTorch's ``meta`` device (no memory, no
arithmetic): that costs a few seconds once (the first use imports torch's compiler stack), in the
launcher or the simulator, and only with replicas.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from lowbw.boundary import build_method
from lowbw.models.flops import stage_blocks
from lowbw.models.gpt import GPTStage
from lowbw.pipeline.partition import partition_layers
from lowbw.replicas.collective import Exchange
from lowbw.replicas.sync import build_sync

Parts = list[tuple[float, list[tuple[int, ...]]]]


def rank_parts(model: Any, sched: Any, seed: int, boundary: Any = None, partition: Optional[list[int]] = None) -> list[Parts]:
    """Per rank of ``sched``, the parameters of the model stages it holds as (weight, shapes) parts.

    ``boundary``: the run's boundary config (its modules are parameters too); ``partition``: blocks per
    stage (None: as even as possible, or fractions of a block when there are more stages than blocks)."""
    n = sched.n_stages
    blocks, fractional = stage_blocks(model.n_layer, n, partition)

    def shapes(stage: GPTStage) -> list[tuple[int, ...]]:
        return [tuple(q.shape) for q in stage.parameters()]

    with torch.device("meta"):  # shapes only
        if fractional:
            block = shapes(GPTStage(model, 0, 1, False, False, seed))
            embed = shapes(GPTStage(model, 0, 0, True, False, seed))
            head = shapes(GPTStage(model, 0, 0, False, True, seed))
            per_stage = [[(nb, block)] + ([(1.0, embed)] if s == 0 else []) + ([(1.0, head)] if s == n - 1 else [])
                         for s, nb in enumerate(blocks)]
        else:
            method = build_method(boundary, model, seed) if boundary is not None else None
            per_stage = [[(1.0, shapes(GPTStage(model, a, b, s == 0, s == n - 1, seed, method=method, index=s)))]
                         for s, (a, b) in enumerate(partition_layers(model.n_layer, n, partition))]
    return [[part for s in sched.stages_of(r) for part in per_stage[s]] for r in range(sched.n_ranks)]


def target_exchanges(cfg: Any, schedule: Any, replicas: int) -> tuple[Optional[Exchange], ...]:
    """Per pipeline rank, the exchange of the regime's target at a step where the method sends; () without
    a regime or replicas."""
    target = cfg.regime.model
    if target is None or replicas == 1:
        return ()
    method = build_sync(cfg.replicas.sync)
    step = getattr(method, "every", 1) - 1  # a step at which the method sends (DiLoCo: the end of a round)
    return tuple(method.exchange(parts, step) for parts in rank_parts(target, schedule, cfg.seed))

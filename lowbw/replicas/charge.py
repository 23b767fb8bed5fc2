"""Under a regime (lowbw/regime.py), what the replicas' messages cost: the target model's, not the run's.

A regime's virtual clock charges each pipeline message what the target's message would take after
the same codec. The replicas' messages get the same treatment: rank ``r``'s synchronisation moves
its stages' parameters (or gradients, or pseudo-gradients), so a message of ``n`` bytes is charged
``n x target / run``, where ``target`` and ``run`` are the bytes the method's formula gives for the
target's stages held by that rank and for the run's own (``SyncMethod.group_bytes_per_step`` on the
tensors' shapes, at a step where it synchronises). The target is cut into stages as the regime cuts
it for its FLOPs (:func:`lowbw.models.flops.stage_blocks`: whole blocks, or equal fractions of the
blocks when there are more stages than blocks), so a stage's bytes are ``blocks x a block's bytes``
plus the embedding on the first stage and the final norm and head on the last.

Shapes come from the model code itself, built on PyTorch's ``meta`` device (no memory, no
arithmetic); that costs a few seconds once, in the launcher, and only for replicas under a regime.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbw.boundary import build_method
from lowbw.models.flops import stage_blocks
from lowbw.models.gpt import GPTStage
from lowbw.replicas.sync import SyncMethod, build_sync

Shapes = list[tuple[int, ...]]


def _shapes(module: torch.nn.Module) -> Shapes:
    return [tuple(p.shape) for p in module.parameters()]


def _sync_step(method: SyncMethod) -> int:
    return getattr(method, "every", 1) - 1  # a step at which the method sends (DiLoCo: the end of a round)


def sync_charges(cfg: Any, schedule: Any, ranges: tuple[tuple[int, int], ...], replicas: int) -> tuple[tuple[int, int], ...]:
    """Per pipeline rank, (target bytes, run bytes) of one synchronisation; () without a regime or replicas."""
    regime = cfg.regime
    if regime.model is None or replicas == 1:
        return ()
    method, n = build_sync(cfg.replicas.sync), schedule.n_stages
    step = _sync_step(method)

    def cost(shapes: Shapes) -> int:
        return method.group_bytes_per_step(shapes, replicas, step)

    run_method = build_method(cfg.boundary, cfg.model, cfg.seed)
    target = regime.model
    with torch.device("meta"):  # shapes only
        run_stages = [_shapes(GPTStage(cfg.model, *ranges[s], s == 0, s == n - 1, cfg.seed, method=run_method,
                                       index=s)) for s in range(n)]
        block = cost(_shapes(GPTStage(target, 0, 1, False, False, cfg.seed)))
        embed = cost(_shapes(GPTStage(target, 0, 0, True, False, cfg.seed)))
        head = cost(_shapes(GPTStage(target, 0, 0, False, True, cfg.seed)))
    blocks, _ = stage_blocks(target.n_layer, n, None)
    target_stage = [nb * block + (embed if s == 0 else 0) + (head if s == n - 1 else 0) for s, nb in enumerate(blocks)]
    out = []
    for r in range(schedule.n_ranks):
        held = schedule.stages_of(r)
        run = sum(cost(run_stages[s]) for s in held)
        out.append((max(1, round(sum(target_stage[s] for s in held))), max(1, run)))
    return tuple(out)

"""The same step through ``torch.distributed.pipelining``: a peer to check lowbw's schedules against.

For a :class:`lowbw.testing.spawn.Scenario` and one of torch's schedule classes (by default the one
:data:`TORCH_SCHEDULES` names for the scenario's schedule), each spawned rank builds its stages with
lowbw's own builder (same partition, same seed, hence the same weights, placed as the scenario's
plan places them: stage s on rank s % p for interleaved and looped schedules, stage r and 2p-1-r
for V-shaped ones), wraps them in torch's ``PipelineStage`` and runs one ``step`` of that class on
the same batch, split into the same microbatches (both cut the batch with ``chunk`` on dim 0).
Gradients come back keyed ``"stage{s}.{param}"`` like :func:`gradcheck.pipeline_grads`.

Loss scaling: torch's schedules call ``loss_fn`` on each microbatch (``_maybe_compute_loss``),
backpropagate that *unscaled* loss, and after the last backward divide every gradient by
``n_microbatches`` (``scale_grads=True``, the default: ``PipelineStage.scale_grads`` via
``perform_reduce_grad``). lowbw divides each microbatch's loss by m before its backward. Both give
the gradient of the mean of the per-microbatch mean losses, i.e. the batch-mean cross-entropy
for equal microbatches; they differ only in floating-point rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed import pipelining as pp

from lowbw.models.gpt import GPTStage
from lowbw.rank.build import build_stages
from lowbw.testing.gradcheck import batch
from lowbw.testing.spawn import Scenario, join, scenario_config, spawned_group

TORCH_SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B",
                   "zb_h1": "ScheduleInterleavedZeroBubble", "zbv": "ScheduleZBVZeroBubble",
                   "dualpipev": "ScheduleDualPipeV"}
#: torch's schedule classes that drive one stage per rank (the others take the rank's list of stages)
SINGLE_STAGE = ("ScheduleGPipe", "Schedule1F1B")


def _check(sc: Scenario, cls: str, world: int) -> None:
    if not hasattr(pp, cls):
        raise ValueError(f"torch.distributed.pipelining has no schedule class {cls!r}")
    if sc.stages != world:
        raise ValueError(f"{sc}: torch's schedules use the whole group; all scenarios need stages={world}")


def _worker(rank: int, world: int, port: int, scenarios: list[Scenario], classes: list[str], configs: list,
            out: str) -> None:
    join(rank, world, port)
    for i, (sc, name, (cfg_dict, plan)) in enumerate(zip(scenarios, classes, configs)):
        sched = plan.schedule
        last = sched.n_stages - 1
        modules = {s: st.module for s, st in build_stages(OmegaConf.create(cfg_dict), plan, rank,
                                                             torch.device("cpu")).items()}
        mine = sorted(modules)
        stages = [pp.PipelineStage(modules[s], s, sched.n_stages, torch.device("cpu")) for s in mine]
        cls = getattr(pp, name)
        loss_fn = GPTStage.loss  # mean cross-entropy of one microbatch; torch divides the grads by m
        if name in SINGLE_STAGE:
            schedule = cls(stages[0], n_microbatches=sc.microbatches, loss_fn=loss_fn)
        else:
            schedule = cls(stages, n_microbatches=sc.microbatches, loss_fn=loss_fn)
        b = batch(sc)
        args = (b.x,) if 0 in mine else ()
        kwargs = {"target": b.y} if last in mine else {}
        schedule.step(*args, **kwargs)
        grads = {f"stage{s}.{n}": q.grad for s in mine for n, q in modules[s].named_parameters()}
        torch.save(grads, Path(out) / f"scenario{i}_rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


def torch_grads(scenarios: list[Scenario], classes: Optional[list[str]] = None,
                timeout_s: float = 240.0) -> list[dict[str, torch.Tensor]]:
    """Run each scenario's one step with torch.distributed.pipelining; gradients by parameter name.

    ``classes``: torch's schedule class per scenario (default: :data:`TORCH_SCHEDULES` of its
    schedule). All scenarios run in one group of ``scenarios[0].stages`` spawned processes
    (start-up, and importing torch.distributed.pipelining, are the expensive part)."""
    world = scenarios[0].stages
    classes = classes or [TORCH_SCHEDULES[sc.schedule] for sc in scenarios]
    for sc, cls in zip(scenarios, classes):
        _check(sc, cls, world)
    configs = [scenario_config(sc) for sc in scenarios]
    with spawned_group(_worker, world, (scenarios, classes, configs), timeout_s,
                       "torch.distributed.pipelining") as out:
        results = []
        for i in range(len(scenarios)):
            grads: dict[str, torch.Tensor] = {}
            for r in range(world):
                grads.update(torch.load(out / f"scenario{i}_rank{r}.pt", weights_only=True))
            results.append(grads)
        return results

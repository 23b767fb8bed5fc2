"""Gradient check: one pipelined step against the same model in one process.

Without compression, the gradients a schedule accumulates over its microbatches must equal those
of the whole model on the whole batch (the executor scales each microbatch's loss by 1/m). This
module runs several scenarios -- schedule, stage count, partition -- in one group of processes
(process start-up is the expensive part) and returns both sets of gradients for comparison.
Used by the tests; useful to anyone adding a schedule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
import torch.distributed as dist

from lowbw.config import ModelConfig


@dataclass
class Scenario:
    schedule: str
    stages: int  # ranks taking part
    microbatches: int = 4
    n_layer: int = 4
    partition: Optional[list[int]] = None
    params: dict = field(default_factory=dict)  # extra schedule parameters, e.g. virtual_stages
    batch_size: int = 8
    seed: int = 7

    def model(self) -> ModelConfig:
        return ModelConfig(n_layer=self.n_layer, n_embd=32, n_head=2, block_size=16)


def _schedule(sc: Scenario):
    from lowbw.pipeline.schedules import build_schedule

    return build_schedule(SimpleNamespace(name=sc.schedule, csv=None, **sc.params), sc.stages, sc.microbatches)


def _batch(sc: Scenario):
    from lowbw.data.corpus import Corpus

    return Corpus(None, sc.model().block_size, 0.1, sc.seed).train_batch(0, sc.batch_size)


def _worker(rank: int, world: int, port: int, scenarios: list[Scenario], out: str) -> None:
    from lowbw.compress import build_codec
    from lowbw.models.gpt import GPTStage
    from lowbw.net.clock import VirtualClock
    from lowbw.net.transport import Transport
    from lowbw.pipeline.executor import PHASE_TRAIN, Executor, StageRuntime
    from lowbw.pipeline.partition import partition_layers
    from lowbw.runtime import channels

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    for i, sc in enumerate(scenarios):
        sched = _schedule(sc)
        if rank >= sched.n_ranks:
            continue
        ranges = partition_layers(sc.n_layer, sched.n_stages, sc.partition)
        clock = VirtualClock(torch.device("cpu"))
        transport = Transport(rank, None, True, 60.0, clock.now)
        stages = {}
        for s in sched.stages_of(rank):
            module = GPTStage(sc.model(), *ranges[s], s == 0, s == sched.n_stages - 1, sc.seed)
            stages[s] = StageRuntime(s, module, *(build_codec("none") for _ in range(4)))
        transport.open(*channels([sched], rank))
        b = _batch(sc)
        Executor(rank, stages, transport, clock, torch.device("cpu")).run(sched, PHASE_TRAIN, i, b.x, b.y, b.ids)
        transport.close()
        grads = {f"stage{s}.{n}": q.grad for s, st in stages.items() for n, q in st.module.named_parameters()}
        torch.save(grads, Path(out) / f"scenario{i}_rank{rank}.pt")
    dist.destroy_process_group()


def reference_grads(sc: Scenario) -> dict[str, torch.Tensor]:
    from lowbw.models.gpt import GPT, GPTStage
    from lowbw.pipeline.partition import partition_layers

    sched = _schedule(sc)
    model = GPT(sc.model(), partition_layers(sc.n_layer, sched.n_stages, sc.partition), sc.seed)
    b = _batch(sc)
    GPTStage.loss(model(b.x), b.y).backward()
    return {f"stage{s}.{n}": q.grad for s, st in enumerate(model.stages) for n, q in st.named_parameters()}


def pipeline_grads(scenarios: list[Scenario], timeout_s: float = 240.0) -> list[dict[str, torch.Tensor]]:
    """Run each scenario's one step pipelined; return the gradients by parameter name."""
    from lowbw.launch import spawned_group

    world = max(_schedule(sc).n_ranks for sc in scenarios)
    with spawned_group(_worker, world, (scenarios,), timeout_s, "gradient check") as out:
        results = []
        for i, sc in enumerate(scenarios):
            grads: dict[str, torch.Tensor] = {}
            for r in range(_schedule(sc).n_ranks):
                grads.update(torch.load(out / f"scenario{i}_rank{r}.pt", weights_only=True))
            results.append(grads)
        return results

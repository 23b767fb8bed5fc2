"""Gradient check: one pipelined step against the same model in one process.

Without compression, the gradients a schedule accumulates over its microbatches must equal those
of the whole model on the whole batch (the executor scales each microbatch's loss by 1/m). This
module runs several scenarios -- schedule, stage count, partition -- in one group of processes
(process start-up is the expensive part), each rank built by the builders of real runs, and returns
both sets of gradients for comparison. Used by the tests; useful to anyone adding a schedule.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from lowbw.boundary import build_method
from lowbw.data.corpus import Corpus
from lowbw.models.gpt import GPT, GPTStage
from lowbw.pipeline.executor import PHASE_TRAIN
from lowbw.testing.spawn import Scenario, join, open_rank, scenario_config, spawned_group

__all__ = ["Scenario", "pipeline_grads", "reference_grads"]


def batch(sc: Scenario):
    """The batch both sides train on: step 0 of the bundled corpus at the scenario's seed."""
    return Corpus(None, sc.model().block_size, 0.1, sc.seed).train_batch(0, sc.batch_size)


def _worker(rank: int, world: int, port: int, configs: list[tuple[dict, object]], out: str) -> None:
    join(rank, world, port)
    for i, (cfg_dict, plan) in enumerate(configs):
        if rank >= plan.schedule.n_ranks:
            continue
        r = open_rank(cfg_dict, plan, rank)
        b = r.corpus.train_batch(0, r.cfg.train.batch_size)
        r.executor.run(plan.schedule, PHASE_TRAIN, i, b.x, b.y, b.ids)
        r.transport.close()
        grads = {f"stage{s}.{n}": q.grad for s, st in r.stages.items() for n, q in st.module.named_parameters()}
        torch.save(grads, Path(out) / f"scenario{i}_rank{rank}.pt")
    dist.destroy_process_group()


def reference_grads(sc: Scenario) -> dict[str, torch.Tensor]:
    """Gradients of the whole model (cut as the scenario's plan cuts it) on the whole batch, in one process."""
    cfg, plan = scenario_config(sc)
    model = GPT(sc.model(), list(plan.ranges), sc.seed, build_method(OmegaConf.create(cfg["boundary"]), sc.model(), sc.seed))
    b = batch(sc)
    GPTStage.loss(model(b.x), b.y).backward()
    return {f"stage{s}.{n}": q.grad for s, st in enumerate(model.stages) for n, q in st.named_parameters()}


def pipeline_grads(scenarios: list[Scenario], timeout_s: float = 240.0) -> list[dict[str, torch.Tensor]]:
    """Run each scenario's one step pipelined; return the gradients by parameter name."""
    configs = [scenario_config(sc) for sc in scenarios]
    world = max(plan.schedule.n_ranks for _, plan in configs)
    with spawned_group(_worker, world, (configs,), timeout_s, "gradient check") as out:
        results = []
        for i, (_, plan) in enumerate(configs):
            grads: dict[str, torch.Tensor] = {}
            for r in range(plan.schedule.n_ranks):
                grads.update(torch.load(out / f"scenario{i}_rank{r}.pt", weights_only=True))
            results.append(grads)
        return results

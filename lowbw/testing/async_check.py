"""PipeDream-2BW checks: several steps pipelined against the same update rule in one process.

:func:`pipelined_2bw` trains a :class:`~lowbw.testing.spawn.Scenario` with schedule ``pipedream_2bw``
in spawned ranks built as real runs build them, and returns each rank's weights, the weight-version
log and the losses; :func:`reference_2bw` runs the rule ``W(t+1) = W(t) - opt(grad f(W(t-1)))`` in
one process with the same optimizer settings.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from lowbw.data.corpus import Corpus
from lowbw.models.gpt import GPT, GPTStage
from lowbw.optim import build_optimizer
from lowbw.pipeline.executor import PHASE_TRAIN
from lowbw.testing.spawn import Scenario, join, open_rank, scenario_config, spawned_group


def _settings(steps: int, lr: float) -> list[str]:
    return [f"train.steps={steps}", f"train.lr={lr}"]


def _check_worker(rank: int, world: int, port: int, cfg_dict: dict, plan, out: str) -> None:
    join(rank, world, port)
    r = open_rank(cfg_dict, plan, rank)
    losses = []
    for step in range(r.cfg.train.steps):
        b = r.corpus.train_batch(step, r.cfg.train.batch_size)
        r.optimizer.zero_grad(set_to_none=True)
        res = r.executor.run(plan.schedule, PHASE_TRAIN, step, b.x, b.y, b.ids)
        r.optimizer.step()
        losses.append(res.loss_sum / res.n_loss if res.n_loss else None)
    r.transport.close()
    stash = r.executor.stash
    weights = {f"stage{s}.{n}": q.detach() for s, st in r.stages.items() for n, q in st.module.named_parameters()}
    torch.save({"weights": weights, "log": stash.log, "losses": losses,
                "left": len(stash.versions) + len(stash.state.outputs)}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def pipelined_2bw(sc: Scenario, steps: int, lr: float = 1e-2, timeout_s: float = 240.0) -> list[dict]:
    """Train ``steps`` steps of ``sc`` (schedule pipedream_2bw) in spawned ranks.

    Returns per rank: final weights ("stage{s}.{param}"), the weight-version log, the per-step loss
    (last rank) and how many versions/outputs were left over at the end (0 after the drain)."""
    cfg_dict, plan = scenario_config(sc, _settings(steps, lr))
    with spawned_group(_check_worker, sc.stages, (cfg_dict, plan), timeout_s, "pipedream_2bw check") as out:
        return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(sc.stages)]


def reference_2bw(sc: Scenario, steps: int, lr: float = 1e-2) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The same run in one process by the 2BW rule W(t+1) = W(t) - opt(grad f(W(t-1))): weights, losses."""
    cfg_dict, plan = scenario_config(sc, _settings(steps, lr))
    cfg = OmegaConf.create(cfg_dict)
    model = GPT(sc.model(), list(plan.ranges), sc.seed)
    named = {f"stage{s}.{n}": q for s, st in enumerate(model.stages) for n, q in st.named_parameters()}
    opt = build_optimizer(cfg.train, list(model.stages))
    corpus = Corpus(None, sc.model().block_size, cfg.data.val_fraction, sc.seed)
    prev, losses = None, []
    for t in range(steps):
        b = corpus.train_batch(t, sc.batch_size)
        opt.zero_grad(set_to_none=True)
        loss = GPTStage.loss(model(b.x), b.y)
        loss.backward()
        losses.append(float(loss.detach()))
        grad = {k: q.grad.clone() for k, q in named.items()}  # gradient at version t
        for k, q in named.items():
            q.grad = prev[k] if prev is not None else None  # apply version t-1's gradient
        opt.step()
        prev = grad
    return {k: q.detach() for k, q in named.items()}, losses

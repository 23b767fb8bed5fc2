"""Training check: a few pipelined steps per scenario, their first gradients, bytes, and a resume.

For each scenario, in one group of processes (start-up is the expensive part), every rank is built
by the builders of real runs and trains ``steps`` optimizer steps through the executor. Returned per
scenario: the gradients of step 0 (before the first update, to compare with
:func:`lowbw.testing.gradcheck.reference_grads`), the loss of every step, the wire bytes and
messages per boundary and direction of step 0, and a resume: after step ``resume_after`` the stages'
and the optimizer's state dicts are saved, fresh stages and a fresh optimizer are built from the
config, loaded from them, and the remaining steps are run again -- their losses and final weights
must equal the uninterrupted ones bit for bit (everything a checkpoint holds is in those state
dicts; what is derived from the seed must be rebuilt identically).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from lowbw.optim import build_optimizer
from lowbw.pipeline.executor import PHASE_TRAIN
from lowbw.rank.build import Rank, build_stages
from lowbw.testing.spawn import Scenario, join, open_rank, scenario_config, spawned_group

__all__ = ["Scenario", "train_runs"]

#: executor step ids of the resumed steps: apart from the first run's, so no message key is reused
_RESUMED = 10_000


def _step(r: Rank, step: int, key: int) -> tuple[float | None, dict]:
    b = r.corpus.train_batch(step, r.cfg.train.batch_size)
    r.optimizer.zero_grad(set_to_none=True)
    res = r.executor.run(r.plan.schedule, PHASE_TRAIN, key, b.x, b.y, b.ids)
    grads = {f"stage{s}.{n}": q.grad.clone() for s, st in r.stages.items() for n, q in st.module.named_parameters()
             if q.grad is not None}
    r.optimizer.step()
    loss = res.loss_sum / res.n_loss if res.n_loss else None
    return loss, {"grads": grads, "codecs": {k: (c.wire_bytes, c.messages) for k, c in res.codecs.items()}}


def _saved(r: Rank) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": {s: st.module.state_dict() for s, st in r.stages.items()},
                "optimizer": r.optimizer.state_dict()}, buf)
    return buf.getvalue()


def _restore_fresh(r: Rank, saved: bytes) -> None:
    """New stages and optimizer built from the config, loaded from ``saved``, put in place of the old."""
    state = torch.load(io.BytesIO(saved), weights_only=True)
    stages = build_stages(r.cfg, r.plan, r.rank, r.device)
    for s, st in stages.items():
        st.module.load_state_dict(state["model"][s])
    optimizer = build_optimizer(r.cfg.train, [st.module for st in stages.values()])
    optimizer.load_state_dict(state["optimizer"])
    r.stages.clear()
    r.stages.update(stages)  # the executor holds this same dict
    r.optimizer = optimizer


def _weights(r: Rank) -> dict[str, torch.Tensor]:
    return {f"stage{s}.{n}": q.detach().clone() for s, st in r.stages.items() for n, q in st.module.named_parameters()}


def _worker(rank: int, world: int, port: int, configs: list, steps: int, resume_after: int, out: str) -> None:
    join(rank, world, port)
    for i, (cfg_dict, plan) in enumerate(configs):
        if rank >= plan.schedule.n_ranks:
            continue
        r = open_rank(cfg_dict, plan, rank)
        losses, first, saved = [], None, None
        for step in range(steps):
            loss, info = _step(r, step, step)
            losses.append(loss)
            first = first or info
            if step == resume_after:
                saved = _saved(r)
        weights = _weights(r)
        _restore_fresh(r, saved)
        resumed = [_step(r, step, _RESUMED + step)[0] for step in range(resume_after + 1, steps)]
        r.transport.close()
        torch.save({"losses": losses, "resumed": resumed, "grads": first["grads"], "codecs": first["codecs"],
                    "weights": weights, "weights_resumed": _weights(r)}, Path(out) / f"scenario{i}_rank{rank}.pt")
    dist.destroy_process_group()


def train_runs(scenarios: list[Scenario], steps: int, resume_after: int, timeout_s: float = 300.0) -> list[dict]:
    """Run each scenario; per scenario the ranks' results merged: ``losses``
    (the last stage's), ``resumed`` (steps after ``resume_after`` again), ``grads`` (step 0), ``codecs``
    (boundary key -> (wire bytes, messages) of step 0), ``weights`` and ``weights_resumed`` (after the last
    step), and ``cfg`` (the plain config)."""
    configs = [scenario_config(sc) for sc in scenarios]
    world = max(plan.schedule.n_ranks for _, plan in configs)
    with spawned_group(_worker, world, (configs, steps, resume_after), timeout_s, "training check") as out:
        results = []
        for i, (cfg, plan) in enumerate(configs):
            merged: dict = {"grads": {}, "codecs": {}, "weights": {}, "weights_resumed": {},
                            "cfg": OmegaConf.create(cfg)}
            for r in range(plan.schedule.n_ranks):
                part = torch.load(out / f"scenario{i}_rank{r}.pt", weights_only=True)
                for key in ("grads", "weights", "weights_resumed"):
                    merged[key].update(part[key])
                for key, (nbytes, messages) in part["codecs"].items():  # the receiver's entries count 0 bytes
                    b0, m0 = merged["codecs"].get(key, (0, 0))
                    merged["codecs"][key] = (b0 + nbytes, m0 + messages)
                if r == plan.schedule.stage_to_rank[plan.schedule.n_stages - 1]:
                    merged["losses"], merged["resumed"] = part["losses"], part["resumed"]
            results.append(merged)
        return results

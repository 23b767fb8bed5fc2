"""PipeDream-2BW checks: several steps pipelined against the same update rule in one process.

:func:`pipelined_2bw` trains a :class:`~lowbw.testing.gradcheck.Scenario` with schedule ``pipedream_2bw``
in spawned ranks and returns each rank's weights, the executor's weight-version log and the losses;
:func:`reference_2bw` runs the rule ``W(t+1) = W(t) - opt(grad f(W(t-1)))`` in one process.
"""

from __future__ import annotations

import torch

from lowbw.pipeline.async_executor import AsyncExecutor
from lowbw.pipeline.executor import PHASE_TRAIN


def _check_worker(rank: int, world: int, port: int, sc, steps: int, lr: float, out: str) -> None:
    import os
    from datetime import timedelta
    from pathlib import Path

    import torch.distributed as dist

    from lowbw.compress import build_codec
    from lowbw.models.gpt import GPTStage
    from lowbw.net.clock import VirtualClock
    from lowbw.net.transport import Transport
    from lowbw.pipeline.executor import StageRuntime
    from lowbw.testing.gradcheck import _schedule
    from lowbw.pipeline.partition import partition_layers
    from lowbw.runtime import channels

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    sched = _schedule(sc)
    ranges = partition_layers(sc.n_layer, sched.n_stages, sc.partition)
    clock = VirtualClock(torch.device("cpu"))
    transport = Transport(rank, None, True, 60.0, clock.now)
    stages = {s: StageRuntime(s, GPTStage(sc.model(), *ranges[s], s == 0, s == sched.n_stages - 1, sc.seed),
                              *(build_codec("none") for _ in range(4))) for s in sched.stages_of(rank)}
    transport.open(*channels([sched], rank))
    ex = AsyncExecutor(rank, stages, transport, clock, torch.device("cpu"), last_step=steps - 1)
    opt = torch.optim.AdamW([q for st in stages.values() for q in st.module.parameters()], lr=lr)
    losses = []
    from lowbw.data.corpus import Corpus

    corpus = Corpus(None, sc.model().block_size, 0.1, sc.seed)
    for step in range(steps):
        b = corpus.train_batch(step, sc.batch_size)
        opt.zero_grad(set_to_none=True)
        res = ex.run(sched, PHASE_TRAIN, step, b.x, b.y, b.ids)
        opt.step()
        losses.append(res.loss_sum / res.n_loss if res.n_loss else None)
    transport.close()
    weights = {f"stage{s}.{n}": q.detach() for s, st in stages.items() for n, q in st.module.named_parameters()}
    torch.save({"weights": weights, "log": ex.log, "losses": losses, "left": len(ex.versions) + len(ex.outputs)},
               Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def pipelined_2bw(sc, steps: int, lr: float = 1e-2, timeout_s: float = 240.0) -> list[dict]:
    """Train ``steps`` steps of ``sc`` (a gradcheck Scenario, schedule pipedream_2bw) in spawned ranks.

    Returns per rank: final weights ("stage{s}.{param}"), the executor's version log, the per-step
    loss (last rank) and how many versions/outputs were left over at the end (0 after the drain)."""
    from lowbw.launch import spawned_group

    with spawned_group(_check_worker, sc.stages, (sc, steps, lr), timeout_s, "pipedream_2bw check") as out:
        return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(sc.stages)]


def reference_2bw(sc, steps: int, lr: float = 1e-2) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The same run in one process by the 2BW rule W(t+1) = W(t) - opt(grad f(W(t-1))): weights, losses."""
    from lowbw.data.corpus import Corpus
    from lowbw.models.gpt import GPT, GPTStage
    from lowbw.pipeline.partition import partition_layers

    model = GPT(sc.model(), partition_layers(sc.n_layer, sc.stages, sc.partition), sc.seed)
    named = {f"stage{s}.{n}": q for s, st in enumerate(model.stages) for n, q in st.named_parameters()}
    opt = torch.optim.AdamW(named.values(), lr=lr)
    corpus = Corpus(None, sc.model().block_size, 0.1, sc.seed)
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

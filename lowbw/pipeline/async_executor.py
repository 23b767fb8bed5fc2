"""The executor of asynchronous schedules (lowbw.pipeline.pipedream_2bw): state that outlives a step.

:class:`Executor` runs one step's actions and forgets them; :class:`AsyncExecutor` keeps, between
steps, the microbatches still in flight (inputs, outputs with their autograd graphs, received
output gradients), the stashed weight versions they run on, and the batches they came from. The
rules of the step itself are :class:`Executor`'s; only forward (on a stashed version, via
``torch.func.functional_call``), message tags (by batch, not step) and the hand-over of the
delayed gradient to the optimizer differ. See lowbw.pipeline.pipedream_2bw for the semantics.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from lowbw.errors import ConfigError
from lowbw.pipeline.actions import Kind, Schedule
from lowbw.pipeline.executor import PHASE_TRAIN, Executor, StepResult
from lowbw.pipeline.pipedream_2bw import AsyncSchedule


class AsyncExecutor(Executor):
    """Runs an :class:`AsyncSchedule` step after step, carrying in-flight microbatches and weight versions.

    Evaluation (and any synchronous schedule) goes to :meth:`Executor.run` with the live weights.
    ``log`` records, per stage and microbatch, the weight version its forward and its backward used
    (the backward's version is *measured*: the version whose gradient buffers the backward wrote),
    and per optimizer step which version's gradient was applied to which.
    """

    def __init__(self, *args, last_step: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_step = last_step
        self.versions: dict[int, dict[int, dict[str, torch.Tensor]]] = {}  # batch -> stage -> name -> leaf
        self.batches: dict[int, tuple] = {}  # batch -> (xs, ys, idss)
        self.inputs: dict[tuple, torch.Tensor] = {}  # (stage, batch, mb) -> input (carried across steps)
        self.outputs: dict[tuple, torch.Tensor] = {}
        self.out_grads: dict[tuple, torch.Tensor] = {}
        self.backwards: dict[int, int] = {}  # batch -> backwards done on this rank
        self.log: list[dict] = []

    @classmethod
    def from_executor(cls, ex: Executor, last_step: int, cfg: Optional[Any] = None) -> "AsyncExecutor":
        if cfg is not None and (cfg.resume or cfg.checkpoint.every):
            raise ConfigError(
                "schedule=pipedream_2bw keeps microbatches and weight versions in flight across steps, which "
                "checkpoints do not hold yet; use checkpoint.every=0 and resume=false"
            )
        return cls(ex.rank, ex.stages, ex.transport, ex.clock, ex.device, ex.planned, last_step=last_step)

    def run(self, sched: Schedule, phase: int, step: int, x: torch.Tensor, y: torch.Tensor,
            ids: torch.Tensor, emulate: bool = True, measure_error: bool = False) -> StepResult:
        if phase != PHASE_TRAIN or not isinstance(sched, AsyncSchedule):
            return super().run(sched, phase, step, x, y, ids, emulate, measure_error)
        from torch.func import functional_call

        m, last = sched.n_microbatches, sched.n_stages - 1
        self.batches[step] = (x.chunk(m), y.chunk(m), ids.chunk(m))
        self.versions[step] = {s: {n: q.detach().clone().requires_grad_(q.requires_grad)
                                   for n, q in st.module.named_parameters()} for s, st in self.stages.items()}
        res = StepResult()
        inputs, outputs, out_grads = self.inputs, self.outputs, self.out_grads

        def record(kind, t0, t1, a, nbytes=0, peer=-1):
            from lowbw.metrics.timeline import Event

            res.events.append(Event(self.rank, kind, t0, t1, step, str(a), nbytes, peer))

        for a, b, i in sched.step_actions(self.rank, step, step == self.last_step):
            s = a.stage
            st = self.stages[s]
            xs, ys, idss = self.batches[b]
            k = (s, b, i)
            if a.kind == Kind.FORWARD:
                if s == 0:
                    inp = xs[i].to(self.device)
                elif k not in inputs:
                    inp = outputs[(s - 1, b, i)].detach().requires_grad_(True)
                else:
                    inp = inputs[k]
                inputs[k] = inp

                def fwd(inp=inp, s=s, b=b, i=i):
                    out = functional_call(self.stages[s].module, self.versions[b][s], (inp,))
                    return self.scaled_loss(out, ys[i], m, res) if s == last else out

                out, t0, t1 = self.clock.compute(fwd, self.planned(a))
                outputs[k] = out
                record("forward", t0, t1, a)
                self.log.append({"what": "forward", "stage": s, "batch": b, "mb": i, "version": b, "step": step})
            elif a.kind == Kind.FULL_BACKWARD:
                grad = None if s == last else out_grads.pop(k, None)
                if s < last and grad is None:
                    grad = inputs[(s + 1, b, i)].grad
                before = {v: _fingerprint(vs[s]) for v, vs in self.versions.items()}
                out = outputs.pop(k)
                _, t0, t1 = self.clock.compute(lambda: torch.autograd.backward(out, grad), self.planned(a))
                record("backward", t0, t1, a)
                used = [v for v, vs in self.versions.items() if _fingerprint(vs[s]) != before[v]]
                self.log.append({"what": "backward", "stage": s, "batch": b, "mb": i, "version": used, "step": step})
                self.backwards[b] = self.backwards.get(b, 0) + 1
                if s == 0 or (s - 1) in self.stages:
                    inputs.pop(k, None)
            elif a.kind == Kind.SEND_F:
                self.send(sched, a, (phase, b, s + 1, i), st.send_fwd, outputs[k].detach(), idss[i], res, record,
                          emulate, measure_error)
            elif a.kind == Kind.SEND_B:
                self.send(sched, a, (phase, b, s - 1, i), st.send_bwd, inputs.pop(k).grad, idss[i], res, record,
                          emulate, measure_error)
            elif a.kind in (Kind.RECV_F, Kind.RECV_B):
                codec = st.recv_fwd if a.kind == Kind.RECV_F else st.recv_bwd
                tensor = self.receive(sched, a, (phase, b, s, i), codec, idss[i], res, record, emulate)
                if a.kind == Kind.RECV_F:
                    inputs[k] = tensor.requires_grad_(True)
                else:
                    out_grads[k] = tensor
            else:
                raise ValueError(f"{sched.name}: action {a} is not supported by the asynchronous executor")
        self._apply_delayed(step, m)
        return res

    def _apply_delayed(self, step: int, m: int) -> None:
        """Hand batch step-1's gradient (computed on version step-1) to the optimizer; drop that version."""
        done = [b for b in self.versions if self.backwards.get(b, 0) == m * len(self.stages)]
        if step >= 1:
            g = step - 1
            if g not in done:
                raise RuntimeError(f"rank {self.rank}: batch {g}'s backwards are not complete at the end of step {step}")
            for s, st in self.stages.items():
                for n, q in st.module.named_parameters():
                    q.grad = self.versions[g][s][n].grad
            self.log.append({"what": "update", "step": step, "grad_version": g, "base_version": step,
                             "new_version": step + 1})
        # drop batch step-1, and after the last step's drain batch step too (its gradient is never applied);
        # a rank without in-flight backwards (the last) completes batch step already now: it waits a step
        for b in [g for g in done if g == step - 1 or step == self.last_step]:
            del self.versions[b], self.batches[b], self.backwards[b]


def _fingerprint(params: dict[str, torch.Tensor]) -> tuple:
    """Changes whenever a backward writes any of these leaves' gradients."""
    return tuple((id(q.grad), q.grad._version) if q.grad is not None else None for q in params.values())


# ---- a check for tests: several steps pipelined against the same update rule in one process ----------


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
    from lowbw.pipeline.gradcheck import _schedule
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

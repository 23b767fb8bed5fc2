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

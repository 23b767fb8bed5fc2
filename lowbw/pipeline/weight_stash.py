"""PipeDream-2BW's state across steps: stashed weight versions, in-flight microbatches, delayed updates.

The executor (lowbw.pipeline.executor) runs an asynchronous schedule
(lowbw.pipeline.schedules.pipedream_2bw) with one of these: it keeps, between steps, the
microbatches still in flight (inputs, outputs with their autograd graphs, received output
gradients -- :attr:`state`), the weight versions they run on and the batches they came from.

- :meth:`begin_step` snapshots the live weights as version ``step`` and files the batch.
- :meth:`forward` runs a stage on the version of the microbatch's batch
  (``torch.func.functional_call``), so its backward accumulates into that version's leaves.
- :meth:`backward` runs a backward and records which version's gradient buffers it wrote
  (*measured*, from the leaves' gradient versions, not assumed).
- :meth:`end_step` hands batch step-1's gradient to the optimizer (the paper's
  ``W(t+1) = W(t) - lr * grad f(W(t-1))``) and drops versions no microbatch needs any more.

``log`` records, per stage and microbatch, the version its forward and its backward used, and per
optimizer step which version's gradient was applied: the tests check staleness from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.func import functional_call


@dataclass
class InFlight:
    """Tensors of microbatches between their actions, keyed (stage, batch, microbatch of the batch)."""

    inputs: dict[tuple, torch.Tensor] = field(default_factory=dict)
    outputs: dict[tuple, torch.Tensor] = field(default_factory=dict)
    out_grads: dict[tuple, torch.Tensor] = field(default_factory=dict)
    tokens: dict[tuple, torch.Tensor] = field(default_factory=dict)  # token ids to send on (lowbw.boundary)

    def __len__(self) -> int:
        return len(self.inputs) + len(self.outputs) + len(self.out_grads) + len(self.tokens)


class WeightStash:
    def __init__(self, rank: int, stages: dict[int, Any], last_step: int):
        self.rank, self.stages, self.last_step = rank, stages, last_step
        self.versions: dict[int, dict[int, dict[str, torch.Tensor]]] = {}  # batch -> stage -> name -> leaf
        self.batches: dict[int, tuple] = {}  # batch -> (xs, ys, idss)
        self.state = InFlight()  # carried across steps
        self.backwards: dict[int, int] = {}  # batch -> backwards done on this rank
        self.log: list[dict] = []

    def begin_step(self, step: int, chunks: tuple) -> None:
        self.batches[step] = chunks
        self.versions[step] = {s: {n: q.detach().clone().requires_grad_(q.requires_grad)
                                   for n, q in st.module.named_parameters()} for s, st in self.stages.items()}

    def forward(self, s: int, b: int, inp: torch.Tensor, tokens: Any = None) -> torch.Tensor:
        return functional_call(self.stages[s].module, self.versions[b][s], (inp, tokens))

    def log_forward(self, s: int, b: int, i: int, step: int) -> None:
        self.log.append({"what": "forward", "stage": s, "batch": b, "mb": i, "version": b, "step": step})

    def backward(self, s: int, b: int, i: int, step: int, run: Callable[[], Any]) -> Any:
        """Run ``run`` (the backward); log the versions whose gradients it wrote."""
        before = {v: _fingerprint(vs[s]) for v, vs in self.versions.items()}
        out = run()
        used = [v for v, vs in self.versions.items() if _fingerprint(vs[s]) != before[v]]
        self.log.append({"what": "backward", "stage": s, "batch": b, "mb": i, "version": used, "step": step})
        self.backwards[b] = self.backwards.get(b, 0) + 1
        return out

    def end_step(self, step: int, m: int) -> None:
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

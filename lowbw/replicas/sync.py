"""How a stage's replicas stay in agreement (``replicas/sync=<name>``): a small base class and a registry.

A :class:`SyncMethod` is called twice in every training step of every rank: after the backward
pass (before gradient clipping and the optimizer) and after the optimizer step. It works on the
parameters of the stages this rank holds, flattened in a fixed order (the same on every replica),
and averages through its :class:`~lowbw.replicas.collective.Averager` -- over the emulated links.

- ``allreduce``: the weight gradients, every step: plain data parallelism. Uncompressed, R replicas
  of batch B compute the gradients of one pipeline on the R x B batch.
- ``diloco`` (Douillard et al. 2023, arXiv 2311.08105): each replica takes ``every`` (H) inner steps
  of the run's optimizer on its own data; then the replicas average the pseudo-gradient (the
  parameters at the start of the round minus now) and an outer SGD step with Nesterov momentum
  moves the round's starting point, which every replica takes as its parameters. H = 1, an outer
  learning rate of 1 and no momentum is data parallelism of the inner optimizer's updates.
- ``sparta`` (Beton et al. 2025, "SPARTA: sparse parameter averaging"): after every optimizer step,
  a random ``fraction`` of the parameters -- the same entries on every replica, drawn from the run's
  seed, the step and the pipeline rank, so no indices travel -- is averaged.

Adding a method: subclass :class:`SyncMethod`, give it a ``name`` and the formula of its bytes,
decorate it with :func:`register_sync`, add ``configs/replicas/sync/<name>.yaml``.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC
from typing import Any, ClassVar, Optional

import torch

from lowbw.compress.base import build_codec
from lowbw.errors import ConfigError
from lowbw.replicas.collective import Averager, Exchange, ReplicaGroup
from lowbw.replicas.per_tensor import PerTensor


Shapes = list[tuple[int, ...]]


class SyncMethod(ABC):
    name: ClassVar[str] = ""

    def __init__(self, **params: Any):
        if params:
            known = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "params")]
            raise ConfigError(f"replicas/sync={self.name} has no parameter {', '.join(map(repr, sorted(params)))}; "
                              f"use one of: {', '.join(known) if known else '(none)'}")
        self.params: list[torch.nn.Parameter] = []
        self.group: ReplicaGroup | None = None
        self.seed = 0

    def bind(self, params: list[torch.nn.Parameter], group: ReplicaGroup, seed: int) -> None:
        """Work on ``params`` (this rank's stages, in order) within ``group``."""
        self.params, self.group, self.seed = params, group, seed

    def after_backward(self, step: int) -> None:
        """The step's gradients are complete; the optimizer has not run."""

    def after_optimizer(self, step: int) -> None:
        """The optimizer has stepped."""

    def exchange(self, parts: list[tuple[float, Shapes]], step: int) -> Optional[Exchange]:
        """What the replica group of a rank sends in training step ``step`` (None: nothing), for parameters
        made of ``parts``: (weight, shapes) -- weight 1 for tensors a rank holds, a fraction of a block for
        lowbw-simulate's stages cut finer than blocks."""
        return None

    def group_bytes_per_step(self, shapes: Shapes, replicas: int, step: int) -> int:
        """Bytes the replica group of a rank whose parameters have these shapes sends in training step ``step``."""
        ex = self.exchange([(1.0, shapes)], step)
        return 0 if ex is None else ex.group_bytes(replicas)

    def _shapes(self) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in self.params]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # The flat vectors live on the CPU in float32 whatever the model's device and dtype: gloo moves bytes
    # through host memory anyway, and a DiLoCo round's start costs no accelerator memory there.

    def _grads(self) -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float().cpu()
                          for p in self.params])

    def _set_grads(self, flat: torch.Tensor) -> None:
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view(p.shape).to(p.device, p.dtype, copy=True)
            offset += n


def _entries(parts: list[tuple[float, Shapes]]) -> int:
    return round(sum(w * sum(math.prod(s) for s in shapes) for w, shapes in parts))


def _averaged(codec: Any, parts: list[tuple[float, Shapes]]) -> Exchange:
    """The exchange that averages the parts' float32 entries through ``codec`` (collective.Averager's rule)."""
    if build_codec(codec).name == "none":
        return Exchange("ring", _entries(parts))
    return Exchange("gather", round(sum(w * PerTensor(codec, shapes).nbytes for w, shapes in parts)))


SYNCS: dict[str, type[SyncMethod]] = {}


def register_sync(cls: type[SyncMethod]) -> type[SyncMethod]:
    SYNCS[cls.name] = cls
    return cls


def build_sync(spec: Any) -> SyncMethod:
    """The method ``replicas.sync`` names, with its parameters (ConfigError naming what is wrong)."""
    params = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = params.pop("name", None)
    if name not in SYNCS:
        raise ConfigError(f"replicas/sync={name!r} is not a synchronisation method; use one of {', '.join(SYNCS)}")
    return SYNCS[name](**params)


def _check_codec(codec: Any, name: str) -> Any:
    probe = build_codec(codec)  # ConfigError for an unknown codec or parameter
    if probe.payload_nbytes((64,), torch.float32) is None:
        raise ConfigError(f"replicas.sync.codec={probe.name}: its payload length is not known before encoding, "
                          f"so replicas cannot post their receives; use a codec with a fixed length for {name}")
    return codec


@register_sync
class AllReduce(SyncMethod):
    name = "allreduce"

    def __init__(self, codec: Any = "none", **params: Any):
        super().__init__(**params)
        self.codec = _check_codec(codec, "allreduce")
        self.average: Averager | None = None

    def bind(self, params, group, seed):
        super().bind(params, group, seed)
        self.average = Averager(group, self.codec, self._shapes())

    def after_backward(self, step: int) -> None:
        if self.group.size == 1:
            return
        self.group.step = step
        flat = self._grads()
        self.average(flat)
        self._set_grads(flat)

    def exchange(self, parts, step):
        return _averaged(self.codec, parts)

    def state_dict(self):
        return {"average": self.average.state_dict()}

    def load_state_dict(self, state):
        if state:
            self.average.load_state_dict(state["average"])


@register_sync
class DiLoCo(SyncMethod):
    name = "diloco"

    def __init__(self, every: int = 50, outer_lr: float = 0.7, outer_momentum: float = 0.9, codec: Any = "none",
                 **params: Any):
        super().__init__(**params)
        if not (isinstance(every, int) and every >= 1):
            raise ConfigError(f"replicas.sync.every={every} must be a whole number of steps >= 1")
        if not (math.isfinite(outer_lr) and outer_lr > 0):
            raise ConfigError(f"replicas.sync.outer_lr={outer_lr} must be a positive number")
        if not 0 <= outer_momentum < 1:
            raise ConfigError(f"replicas.sync.outer_momentum={outer_momentum} must lie in [0, 1)")
        self.every, self.outer_lr, self.outer_momentum = every, float(outer_lr), float(outer_momentum)
        self.codec = _check_codec(codec, "diloco")
        self.anchor: list[torch.Tensor] = []
        self.outer: torch.optim.Optimizer | None = None
        self.average: Averager | None = None

    def bind(self, params, group, seed):
        super().bind(params, group, seed)
        self.average = Averager(group, self.codec, self._shapes())
        # the round's starting point, in float32 whatever the model's dtype (the outer step accumulates)
        self.anchor = [p.detach().float().cpu().clone().requires_grad_(True) for p in params]
        self.outer = torch.optim.SGD(self.anchor, lr=self.outer_lr, momentum=self.outer_momentum,
                                     nesterov=self.outer_momentum > 0)

    def after_optimizer(self, step: int) -> None:
        if self.group.size == 1 or (step + 1) % self.every:
            return
        self.group.step = step
        with torch.no_grad():
            delta = torch.cat([(a - p.detach().float().cpu()).reshape(-1) for a, p in zip(self.anchor, self.params)])
            self.average(delta)  # the outer gradient: the replicas' mean pseudo-gradient
            offset = 0
            for a in self.anchor:
                a.grad = delta[offset:offset + a.numel()].view_as(a)  # delta is this sync's own: no copy
                offset += a.numel()
            self.outer.step()
            for a, p in zip(self.anchor, self.params):
                p.copy_(a.to(p.device, p.dtype))

    def exchange(self, parts, step):
        return _averaged(self.codec, parts) if (step + 1) % self.every == 0 else None

    def state_dict(self):
        return {"anchor": [a.detach().clone() for a in self.anchor], "outer": self.outer.state_dict(),
                "average": self.average.state_dict()}

    def load_state_dict(self, state):
        if not state:
            return
        with torch.no_grad():
            for a, saved in zip(self.anchor, state["anchor"]):
                a.copy_(saved)
        self.outer.load_state_dict(state["outer"])
        self.average.load_state_dict(state["average"])


@register_sync
class Sparta(SyncMethod):
    name = "sparta"

    def __init__(self, fraction: float = 0.001, **params: Any):
        super().__init__(**params)
        if not 0 < fraction <= 1:
            raise ConfigError(f"replicas.sync.fraction={fraction} must lie in (0, 1]")
        self.fraction = float(fraction)

    def count(self, n_params: int) -> int:
        """Entries averaged a step: fraction x N, rounded, at least one."""
        return max(1, round(self.fraction * n_params))

    def indices(self, step: int, n_params: int) -> torch.Tensor:
        """The entries averaged at ``step``: the same on every replica of the group (seed, step, pipeline rank).

        k of N without replacement, in O(k log k): draw k, drop repeats, draw again for what is missing
        (randperm would cost O(N) a step)."""
        # a tuple of ints hashes the same in every process (PYTHONHASHSEED salts only str and bytes)
        g = torch.Generator().manual_seed(hash((self.seed, step, self.group.members[0])) & (2**63 - 1))
        k = self.count(n_params)
        idx = torch.empty(0, dtype=torch.long)
        while idx.numel() < k:
            idx = torch.cat([idx, torch.randint(n_params, (k - idx.numel(),), generator=g)]).unique()
        return idx

    def after_optimizer(self, step: int) -> None:
        if self.group.size == 1:
            return
        self.group.step = step
        ends = torch.tensor([p.numel() for p in self.params]).cumsum(0)
        idx = self.indices(step, int(ends[-1]))  # sorted
        owner = torch.searchsorted(ends, idx, right=True)  # which parameter holds each entry
        with torch.no_grad():  # only the k chosen entries move: no copy of the whole model a step
            picked = [(self.params[i], (idx[owner == i] - (ends[i - 1] if i else 0)).to(self.params[i].device))
                      for i in owner.unique().tolist()]
            values = torch.cat([p.detach().reshape(-1)[at].float().cpu() for p, at in picked])
            self.group.all_reduce_mean(values)
            offset = 0
            for p, at in picked:
                p.view(-1)[at] = values[offset:offset + at.numel()].to(p.device, p.dtype)
                offset += at.numel()

    def exchange(self, parts, step):
        return Exchange("ring", self.count(_entries(parts)))

"""The optimizer of a rank's stages (``train.optimizer``): AdamW, Muon with AdamW beside it, or SGD.

``adamw``: ``torch.optim.AdamW`` on every parameter.

``sgd``: ``torch.optim.SGD`` on every parameter, no momentum (weight decay added to the gradient):
the optimizer whose update is linear in the gradient, so that averaging the parameters of replicas
after a step is averaging their gradients before it (lowbw.replicas: DiLoCo with H = 1 is then data
parallelism, which tests/test_replicas.py checks).

``muon``: ``torch.optim.Muon`` on the weight matrices inside the transformer blocks, AdamW on the
rest -- the token embedding, the position table, the head, every norm's gain and every bias. That
split is the one Muon's authors and torch's documentation prescribe: Muon orthogonalises the update
of a hidden layer's 2-D weight; "other parameters, such as bias, and embedding, should be optimized
by a standard method such as AdamW" (torch.optim.Muon), and the input and output layers too, although
2-D, because AdamW does better on them (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/).

Muon needs nothing from other ranks: each matrix lives whole in one stage, so orthogonalising its
update is local -- pipeline parallelism leaves the optimizer as it is in one process (unlike
tensor or ZeRO sharding, where a matrix's pieces would have to be gathered first).

The two optimizers are one :class:`MuonWithAdamW` with one ``state_dict``: a checkpoint holds both
states and a resume restores both.
"""

from __future__ import annotations

from collections import ChainMap
from typing import Any, Callable, Optional

import torch
import torch.nn as nn


class MuonWithAdamW(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped together, saved and loaded as one.

    ``param_groups`` are the parts' own group dicts (an lr scheduler that scales ``group["lr"]``
    reaches them); ``state`` is a read-only view of the parts' states.
    """

    def __init__(self, parts: dict[str, torch.optim.Optimizer]):
        self.parts = parts
        # Optimizer.__init__ appends the very dicts it is given (add_param_group keeps the object),
        # so the parts and this optimizer share their groups.
        super().__init__([g for opt in parts.values() for g in opt.param_groups], {})
        self.state = ChainMap(*(opt.state for opt in parts.values()))  # type: ignore[assignment]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.parts.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.parts.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != set(self.parts):
            raise ValueError(f"the saved optimizer has parts {sorted(state_dict)} but this one has "
                             f"{sorted(self.parts)}: was train.optimizer changed since the checkpoint?")
        for name, opt in self.parts.items():
            opt.load_state_dict(state_dict[name])


def hidden_matrices(modules: list[nn.Module]) -> list[nn.Parameter]:
    """The 2-D weights inside the modules' transformer blocks (``module.blocks``), in order."""
    return [q for m in modules for block in getattr(m, "blocks", ()) for q in block.parameters() if q.ndim == 2]


def _adamw(train_cfg: Any, modules: list[nn.Module]) -> torch.optim.Optimizer:
    params = [q for m in modules for q in m.parameters()]
    return torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)


def _muon(train_cfg: Any, modules: list[nn.Module]) -> torch.optim.Optimizer:
    hidden = hidden_matrices(modules)
    taken = {id(q) for q in hidden}
    rest = [q for m in modules for q in m.parameters() if id(q) not in taken]
    parts: dict[str, torch.optim.Optimizer] = {}
    if hidden:  # a stage without blocks has no matrix for Muon
        parts["muon"] = torch.optim.Muon(hidden, lr=train_cfg.muon_lr, momentum=train_cfg.muon_momentum,
                                         weight_decay=train_cfg.weight_decay)
    if rest:
        parts["adamw"] = torch.optim.AdamW(rest, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    return MuonWithAdamW(parts)


def _sgd(train_cfg: Any, modules: list[nn.Module]) -> torch.optim.Optimizer:
    params = [q for m in modules for q in m.parameters()]
    return torch.optim.SGD(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)


OPTIMIZERS: dict[str, Callable[[Any, list[nn.Module]], torch.optim.Optimizer]] = {
    "adamw": _adamw, "muon": _muon, "sgd": _sgd}


def build_optimizer(train_cfg: Any, modules: list[nn.Module]) -> torch.optim.Optimizer:
    """The optimizer ``train_cfg.optimizer`` names over the parameters of ``modules`` (a rank's stages)."""
    return OPTIMIZERS[train_cfg.optimizer](train_cfg, modules)

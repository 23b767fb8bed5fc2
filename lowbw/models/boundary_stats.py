"""What would cross a stage boundary, and the two numbers that say how well it compresses.

Any block's output is a place the model can be cut, so :func:`block_outputs` runs a model in one
process and keeps, after every block, the activations (what a boundary sends forward) and their
gradients (what it sends back). For each, :func:`boundary_stats` gives

* ``max_over_rms``: the largest magnitude over the root mean square. A quantiser with one scale per
  tensor (or per row) spends its levels up to the maximum; the larger this ratio, the fewer levels
  the typical value gets (outlier features, Dettmers et al. 2022, arXiv 2208.07339).
* ``effective_rank``: exp of the entropy of the normalised singular values of the [tokens, width]
  matrix (Roy & Vetterli 2007, "The effective rank: a measure of effective dimensionality"). Low
  rank is what low-rank codecs (PowerSGD, lowbw's ``powersgd``) and residual bottlenecks exploit.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn

from lowbw.models.gpt import GPTStage


def max_over_rms(x: torch.Tensor) -> float:
    x = x.detach().double()
    return float(x.abs().max() / x.pow(2).mean().sqrt())


def effective_rank(x: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank of x as a [rows, last dim] matrix (not centred: a codec sends x as is)."""
    s = torch.linalg.svdvals(x.detach().reshape(-1, x.shape[-1]).double())
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def block_outputs(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list, list]:
    """(activations, gradients) after each block of ``model`` (a :class:`~lowbw.models.gpt.GPT`), over
    ``batches`` of (ids, targets): one [tokens, width] tensor per block, the batches' rows stacked."""
    blocks = [b for stage in model.stages for b in stage.blocks]
    acts: list[list[torch.Tensor]] = [[] for _ in blocks]
    grads: list[list[torch.Tensor]] = [[] for _ in blocks]

    def keep(i: int):
        def hook(_module, _inputs, out):
            acts[i].append(out.detach().reshape(-1, out.shape[-1]))
            out.register_hook(lambda g: grads[i].append(g.detach().reshape(-1, g.shape[-1])))
        return hook

    handles = [b.register_forward_hook(keep(i)) for i, b in enumerate(blocks)]
    try:
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            GPTStage.loss(model(x), y).backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return [torch.cat(a) for a in acts], [torch.cat(g) for g in grads]


def boundary_stats(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[dict]:
    """Per block output: max/RMS and effective rank of the activations and of their gradients."""
    acts, grads = block_outputs(model, batches)
    return [{"block": i, "act_max_over_rms": max_over_rms(a), "act_effective_rank": effective_rank(a),
             "grad_max_over_rms": max_over_rms(g), "grad_effective_rank": effective_rank(g), "width": a.shape[-1]}
            for i, (a, g) in enumerate(zip(acts, grads))]

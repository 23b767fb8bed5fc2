"""Structured (column) sparsification at stage boundaries (after Pluralis, "Beyond Top-K: Structured
Sparsification for Compression in Pipeline Parallel", ICLR 2025 MCDC workshop).

Of the d features of the residual stream, a fixed set of m = round(keep x d) columns crosses each
boundary; the receiving stage puts them back in place and the other columns are zero there. The
set is drawn per boundary from the seed (a seeded permutation's first m entries, sorted), so both
ends know it and only values go on the wire: m a token forward, and the gradient of the same m
columns back -- exact for what is sent, no indices, no error feedback.

What we chose: the set is fixed for the whole run rather than redrawn every step. Fixed, the dropped
columns are a structural choice the model trains around (it learns to carry what a later stage needs
in the kept columns, as a width-m bottleneck on coordinate axes); a set redrawn per step would act
as feature dropout and would need the step inside the model. No parameters, no FLOPs (an index
and a scatter).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from lowbw.boundary.base import BoundaryMethod, register_method, seeded
from lowbw.errors import ConfigError


class ColumnSender(nn.Module):
    def __init__(self, columns: torch.Tensor):
        super().__init__()
        self.register_buffer("columns", columns, persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.index_select(-1, self.columns)


class ColumnReceiver(nn.Module):
    def __init__(self, columns: torch.Tensor, d: int):
        super().__init__()
        self.d = d
        self.register_buffer("columns", columns, persistent=False)

    def forward(self, x: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.d).index_copy(-1, self.columns, x)


@register_method
class Columns(BoundaryMethod):
    name = "columns"

    def __init__(self, model: Any, spec: Any, seed: int):
        super().__init__(model, spec, seed)
        self.keep = float(spec.keep)
        self.m = max(1, round(self.keep * self.d))

    def check(self) -> None:
        # (0 < keep < 1 is lowbw.limits' range, checked before any method is built; rounding can still keep
        # every column of a narrow model)
        if self.m >= self.d:
            raise ConfigError(f"boundary.keep={self.keep} keeps all {self.d} columns of model.n_embd={self.d} "
                              "(round(keep x n_embd)); lower it so that fewer columns cross than the stream has")

    def columns(self, boundary: int) -> torch.Tensor:
        return torch.randperm(self.d, generator=seeded(self.seed, 2000 + boundary))[: self.m].sort().values

    def sender(self, boundary: int) -> nn.Module:
        return ColumnSender(self.columns(boundary))

    def receiver(self, boundary: int) -> nn.Module:
        return ColumnReceiver(self.columns(boundary), self.d)

    def describe(self) -> str:
        return f"columns, keep {self.keep:g}: {self.m} of {self.d} features a token each way"

    def wire_width(self) -> int:
        return self.m

"""Subspace networks (Ramasinghe et al. 2025, "Protocol Models", arXiv 2506.01260), as lowbw builds them.

A seeded orthonormal basis U (d x k) and a fixed random token table F (V x d) are identical on every
rank, from the seed alone (nothing is sent to agree on them). Every block's output projections --
attention's and the MLP's -- produce k values that U lifts into the residual stream, and the
trainable token embedding is k-dimensional, lifted by U too. So the residual stream is always

    h = F[tokens] + U c,

with c the k coordinates that the embedding and every block add to. A boundary sends c (and the
token ids, :data:`~lowbw.boundary.base.TOKEN_ID_BYTES` each) forward, the receiver rebuilds h from
them, and the gradient of c (k values) goes back: exact up to the dtype's rounding of ``U c``.

What we chose where the reading was open: F is N(0, 0.02) like the dense embedding's initialisation,
U is the Q of a seeded Gaussian's QR; a stage carries (h, c) and updates both (h += U delta,
c += delta), which costs the same FLOPs as rebuilding h before each branch. ``match_params`` gives
the parameters the narrow projections free (d x (d - k) per attention projection, h x (d - k) per
MLP projection) back to the MLP's hidden width, block by block; the embedding's V x (d - k) is
not given back (it sits on the first stage only). The GPT-2 block's position table is k wide and
lifted by U as the token embedding is.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from lowbw.boundary.base import BoundaryMethod, orthonormal, register_method, seeded
from lowbw.errors import ConfigError
from lowbw.models.modern import modern_settings, swiglu_hidden

_BASIS, _TABLE = 0, 1  # tags of U's and F's generators


class SubspaceEmbedding(nn.Module):
    """ids -> (F[ids] + U c, c), c = E[ids] (+ P[positions] for the GPT-2 block), E and P trainable, k wide."""

    def __init__(self, vocab: int, basis: torch.Tensor, table: torch.Tensor, positions: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, basis.shape[1])
        self.wpe = nn.Embedding(positions, basis.shape[1]) if positions else None
        self.register_buffer("U", basis, persistent=False)  # from the seed: not saved, rebuilt identically
        self.register_buffer("F", table, persistent=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.wte(ids)
        if self.wpe is not None:
            c = c + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        return self.F[ids] + c @ self.U.T, c


class SubspaceReceiver(nn.Module):
    """(c, token ids) that crossed -> (F[tokens] + U c, c): the sender's residual stream, rebuilt."""

    def __init__(self, basis: torch.Tensor, table: torch.Tensor):
        super().__init__()
        self.register_buffer("U", basis, persistent=False)
        self.register_buffer("F", table, persistent=False)

    def forward(self, c: torch.Tensor, tokens: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens is None:
            raise ValueError("boundary=subspace: a receiving stage needs the token ids that crossed with c")
        return self.F[tokens.to(c.device)] + c @ self.U.T, c


class SubspaceSender(nn.Module):
    """(h, c) -> c: only the coordinates cross."""

    def forward(self, stream: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return stream[1]


class SubspaceBlock(nn.Module):
    """A block whose branches (``block.branches()``: (norm, attention), (norm, MLP)) write k values lifted by U."""

    def __init__(self, block: nn.Module, basis: torch.Tensor):
        super().__init__()
        self.block = block
        self.register_buffer("U", basis, persistent=False)

    def forward(self, stream: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = stream
        for norm, branch in self.block.branches():
            delta = branch(norm(h))
            h, c = h + delta @ self.U.T, c + delta
        return h, c


def _linear(n_in: int, n_out: int, like: nn.Linear) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=like.bias is not None)


@register_method
class Subspace(BoundaryMethod):
    name = "subspace"
    sends_tokens = True

    def __init__(self, model: Any, spec: Any, seed: int):
        super().__init__(model, spec, seed)
        self.k = int(spec.rank)
        self.match = bool(spec.match_params)
        swiglu = model.arch == "modern" and modern_settings(model)[0] == "swiglu"
        self.n_in = 2 if swiglu else 1  # matrices into the MLP's hidden layer (SwiGLU: gate and fc)
        self.hidden = swiglu_hidden(self.d) if swiglu else 4 * self.d
        self.gpt2 = model.arch == "gpt2"
        self._basis: Optional[torch.Tensor] = None
        self._table: Optional[torch.Tensor] = None

    def check(self) -> None:
        # (rank >= 1 is lowbw.limits' range, checked before any method is built)
        if self.k >= self.d:
            raise ConfigError(f"boundary.rank={self.k} must be less than model.n_embd={self.d} for boundary=subspace "
                              "(it sends rank coordinates a token instead of n_embd values)")

    def hidden_width(self) -> int:
        """The MLP's hidden width: the dense one, or (match_params) the widest whose block has no more
        weights than the dense block: n_in d h' + h' k = n_in d h + h d + d (d - k)."""
        if not self.match:
            return self.hidden
        d, k, h = self.d, self.k, self.hidden
        return (self.n_in * d * h + h * d + d * (d - k)) // (self.n_in * d + k)

    def basis(self) -> torch.Tensor:
        if self._basis is None:
            self._basis = orthonormal(self.d, self.k, seeded(self.seed, _BASIS))
        return self._basis

    def table(self) -> torch.Tensor:
        if self._table is None:
            self._table = torch.randn(self.model.vocab_size, self.d, generator=seeded(self.seed, _TABLE)) * 0.02
        return self._table

    def embedding(self) -> nn.Module:
        positions = self.model.block_size if self.model.arch == "gpt2" else 0  # the modern block: rotary, no table
        return SubspaceEmbedding(self.model.vocab_size, self.basis(), self.table(), positions)

    def adapt_block(self, block: nn.Module) -> nn.Module:
        attn, mlp, h = block.attn, block.mlp, self.hidden_width()
        attn.proj = _linear(attn.proj.in_features, self.k, attn.proj)
        for name in ("gate", "fc"):
            if hasattr(mlp, name):
                setattr(mlp, name, _linear(self.d, h, getattr(mlp, name)))
        mlp.proj = _linear(h, self.k, mlp.proj)
        return SubspaceBlock(block, self.basis())

    def sender(self, boundary: int) -> nn.Module:
        return SubspaceSender()

    def receiver(self, boundary: int) -> nn.Module:
        return SubspaceReceiver(self.basis(), self.table())

    def residual(self, stream: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return stream[0]

    def describe(self) -> str:
        mlp = f", MLP hidden width {self.hidden_width()} (dense {self.hidden}, match_params)" if self.match else ""
        return f"subspace of rank {self.k}: {self.k} coordinates + the token id forward, {self.k} back{mlp}"

    def wire_width(self) -> int:
        return self.k

    def param_delta(self, n_stages: int) -> int:
        d, k, h, h2, n = self.d, self.k, self.hidden, self.hidden_width(), self.n_in
        weights = (d * k + n * d * h2 + h2 * k) - (d * d + n * d * h + h * d)
        biases = (2 * (k - d) + n * (h2 - h)) if self.gpt2 else 0  # attention and MLP projections, fc
        tables = self.model.vocab_size + (self.model.block_size if self.gpt2 else 0)  # GPT-2: a position table too
        return self.model.n_layer * (weights + biases) - tables * (d - k)

    def flop_terms(self, microbatch: int) -> dict[str, tuple[float, float]]:
        N = microbatch * self.model.block_size
        d, k, h, h2, n = self.d, self.k, self.hidden, self.hidden_width(), self.n_in
        lifts = 4.0 * N * k * d  # U delta after each of the two branches; U is fixed: backward only for delta
        fwd = 2.0 * N * d * (k - d) + 2.0 * N * n * d * (h2 - h) + 2.0 * N * (h2 * k - h * d) + lifts
        lift = 2.0 * N * k * d  # U c, where a stage's stream is built
        # a sending stage's output is c alone: its last block's final U delta feeds nothing backward
        return {"block": (fwd, 2 * fwd - lifts), "embed": (lift, lift), "recv": (lift, lift), "send": (0.0, -lift)}

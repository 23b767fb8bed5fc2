"""Residual bottleneck at stage boundaries (after Aboudib et al. 2026, "ResBM", arXiv 2604.11947).

A trainable encoder on the sending stage maps the residual stream h (d values a token) to w values,
and a trainable decoder on the receiving stage maps them back, around an explicit low-rank
identity path:

    z  = Q^T h + E rmsnorm(h)        (sender; E: w x d, trainable)
    h' = Q z + D z                   (receiver; D: d x w, trainable)

Q (d x w) is a seeded orthonormal basis per boundary, identical on both ends from the seed (nothing
is sent to agree on it). With E = D = 0 -- their initialisation -- the boundary passes exactly the
projection of h onto span(Q): the identity path, from which training starts and which it keeps;
E and D learn, end to end with the model, what else to send and how to read it. What we chose where
the paper leaves room: linear encoder and decoder (w x d parameters each, 4 N d w FLOPs a side
forward), the encoder reading RMS-normalised h (the residual stream's scale grows with depth), Q
fixed rather than trained. The wire carries z: w values a token each way, exactly (the gradient of z
goes back).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbw.boundary.base import BoundaryMethod, orthonormal, register_method, seeded

from lowbw.errors import ConfigError


class BottleneckEncoder(nn.Module):
    def __init__(self, basis: torch.Tensor):
        super().__init__()
        d, w = basis.shape
        self.register_buffer("Q", basis, persistent=False)  # from the seed: not saved, rebuilt identically
        self.enc = nn.Linear(d, w, bias=False)
        nn.init.zeros_(self.enc.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.Q + self.enc(F.rms_norm(h, (h.shape[-1],)))


class BottleneckDecoder(nn.Module):
    def __init__(self, basis: torch.Tensor):
        super().__init__()
        d, w = basis.shape
        self.register_buffer("Q", basis, persistent=False)
        self.dec = nn.Linear(w, d, bias=False)
        nn.init.zeros_(self.dec.weight)

    def forward(self, z: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        return z @ self.Q.T + self.dec(z)


@register_method
class Bottleneck(BoundaryMethod):
    name = "bottleneck"

    def __init__(self, model: Any, spec: Any, seed: int):
        super().__init__(model, spec, seed)
        self.w = int(spec.width)

    def check(self) -> None:
        # (width >= 1 is lowbw.limits' range, checked before any method is built)
        if self.w >= self.d:
            raise ConfigError(f"boundary.width={self.w} must be less than model.n_embd={self.d} for "
                              "boundary=bottleneck (it sends width features a token instead of n_embd values)")

    def basis(self, boundary: int) -> torch.Tensor:
        return orthonormal(self.d, self.w, seeded(self.seed, 1000 + boundary))

    def sender(self, boundary: int) -> nn.Module:
        return BottleneckEncoder(self.basis(boundary))

    def receiver(self, boundary: int) -> nn.Module:
        return BottleneckDecoder(self.basis(boundary))

    def describe(self) -> str:
        return f"bottleneck of width {self.w}: {self.w} values a token each way"

    def wire_width(self) -> int:
        return self.w

    def param_delta(self, n_stages: int) -> int:
        return (n_stages - 1) * 2 * self.d * self.w  # E and D at every boundary

    def flop_terms(self, microbatch: int) -> dict[str, tuple[float, float]]:
        side = 2.0 * microbatch * self.model.block_size * self.d * self.w  # one d x w product
        # each side: the fixed Q product (backward: input gradient only) and a trained matrix (input + weight)
        return {"send": (2 * side, 3 * side), "recv": (2 * side, 3 * side)}

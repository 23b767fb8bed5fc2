"""``powersgd``: rank-``r`` approximation of ``x`` viewed as a matrix ``M = x.reshape(-1, d)``.

One power iteration, warm-started (PowerSGD, Vogels et al. 2019): with ``Q`` the sender's state
(``d×r``, seeded Gaussian at first),

    P = orthonormalize(M·Q)      (n×r, QR)
    Q ← Mᵀ·P                     (d×r, kept as the next warm start)
    x̂ = P·Qᵀ = P·Pᵀ·M            (the projection of M onto span P)

What must the receiver know? ``x̂ = P·Qᵀ`` needs both factors, and the new ``Q`` depends on this
message's ``M``, which the receiver never sees -- so the payload carries ``P`` *and* ``Q`` every
time, and the receiver keeps no state at all (nothing can drift out of step). The warm start is
the sender's alone. Bytes: ``(n + d)·r·sizeof(factor_dtype)`` + header, ``r = min(rank, n, d)``.

Bound: ``x̂`` is an orthogonal projection of ``M``, so ``‖x̂ − M‖ ≤ ‖M‖`` always, with equality
only if ``M`` is orthogonal to everything kept; inputs of rank ≤ r come back exactly (up to float
rounding), and repeated calls on similar inputs converge to the best rank-r approximation (subspace
iteration). 16-bit factors add at most ``u·(sqrt(r)+1)·‖M‖`` (u: unit roundoff). This codec only
pays off when activations are close to low rank; there is no error feedback.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowbw.compress import _util
from lowbw.compress.base import Codec, register_codec
from lowbw.compress.payload import pack, packed_size, unpack

_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    d = int(shape[-1])
    return (_util.numel(shape) // d if d else 0), d


@register_codec
class PowerSGD(Codec):
    """Rank-``rank`` power-iteration approximation, warm-started; sends both factors."""

    name = "powersgd"
    stateful = True

    def __init__(self, rank: int = 4, factor_dtype: str = "float32", seed: int = 0, **params: Any):
        super().__init__(**params)
        self.rank = _util.check_int(self.name, "rank", rank, 1, "the rank r of the approximation")
        self.factor_dtype = _util.check_dtype(self.name, "factor_dtype", factor_dtype)
        self.seed = _util.check_int(self.name, "seed", seed, 0, "seed of the initial Q")
        self._q: torch.Tensor | None = None

    def _r(self, n: int, d: int) -> int:
        return min(self.rank, n, d)

    def _warm_start(self, d: int, r: int, device: torch.device) -> torch.Tensor:
        q = self._q
        if q is not None and q.shape == (d, r):
            return q.to(device)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + d)
        return torch.randn(d, r, generator=g).to(device)

    def encode(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        _util.check_float(self.name, x)
        n, d = _matrix_shape(tuple(x.shape))
        r = self._r(n, d)
        m = x.detach().reshape(n, d).float()
        p = torch.linalg.qr(m @ self._warm_start(d, r, x.device)).Q
        q = m.t() @ p
        # a zero or non-finite column would stall the iteration forever: restart from random then
        if r and not (torch.isfinite(q).all() and bool((q.norm(dim=0) > 0).all())):
            self._q = None
        else:
            self._q = q
        return pack([_util.meta(x), p.to(self.factor_dtype), q.to(self.factor_dtype)])

    def decode(self, payload: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        m, p, q = unpack(payload)
        dtype, _, shape = _util.read_meta(m)
        return (p.float() @ q.float().t()).to(dtype).reshape(shape)

    def payload_bytes(self, shape: tuple[int, ...]) -> int:
        n, d = _matrix_shape(tuple(shape))
        r = self._r(n, d)
        return packed_size([_util.meta_spec(shape), (self.factor_dtype, (n, r)), (self.factor_dtype, (d, r))])

    def estimate_ratio(self, shape: tuple[int, ...], dtype: torch.dtype) -> float:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return _util.numel(shape) * itemsize / self.payload_bytes(tuple(shape))

    def error_bound(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> float:
        n, d = _matrix_shape(tuple(x.shape))
        u = _UNIT_ROUNDOFF[self.factor_dtype]
        out_u = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}.get(x.dtype, 0.0)
        return 1.0 + u * (math.sqrt(self._r(n, d)) + 1) * (1 + u) + out_u + 1e-4

    def state_dict(self) -> dict[str, Any]:
        return {"q": self._q if self._q is not None else torch.zeros(0)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        q = state["q"]
        self._q = q.clone() if q.numel() else None

    def reset(self) -> None:
        self._q = None

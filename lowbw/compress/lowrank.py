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

Bound: ``x̂`` is (up to rounding) the orthogonal projection of ``M`` onto ``span P``, so
``‖x̂ − M‖ ≤ ‖M‖`` always -- a bound no test can catch failing. :meth:`PowerSGD.error_bound`
gives the tight one instead: it computes the ``P`` this message would carry (same warm start, same
float32 operations, state untouched), the residual ``‖M − P·Pᵀ·M‖`` in float64, and adds what
float32 arithmetic and the casts can add (see :func:`_rounding_slack`). A receiver that decodes
anything but ``P·Qᵀ`` (a factor dropped, a stale ``Q``) exceeds it. Inputs of rank ≤ r come back
exactly (up to float rounding), and repeated calls on similar inputs converge to the best rank-r
approximation (subspace iteration). This codec only pays off when activations are close to low
rank; there is no error feedback.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowbw.compress import _util
from lowbw.compress.base import Codec, register_codec
from lowbw.compress.payload import pack, packed_size, unpack

_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# (unit roundoff, half the smallest subnormal) of the final cast to a 16-bit input dtype (IEEE 754 binary16;
# bfloat16 has float32's exponent range)
_OUTPUT_ROUNDING = {torch.float16: (2.0**-11, 2.0**-25), torch.bfloat16: (2.0**-8, 2.0**-134)}


def _gamma(k: int, u: float) -> float:
    """Higham's γ_k = k·u / (1 − k·u): relative error bound of a k-term sum or dot product in precision u."""
    return k * u / (1 - k * u)


def _rounding_slack(shape: tuple[int, int], r: int, factor_dtype: torch.dtype, out_dtype: torch.dtype,
                    m_norm: float, p: torch.Tensor, q_norm: float) -> float:
    """Upper bound on ‖x̂ − P·(Mᵀ·P)ᵀ‖ (Frobenius) from float32 arithmetic and the casts.

    Standard error analysis (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed. 2002,
    Sec. 3.5: ``|fl(AB) − AB| ≤ γ_k·|A|·|B|`` for inner dimension k), with ``‖ |A|·|B| ‖_F ≤
    ‖A‖_F·‖B‖_F``: Q = fl(Mᵀ·P) errs by at most ``γ_n·‖M‖·‖P‖_F``; casting P and Q to
    ``factor_dtype`` by ``u_f`` of each; the receiver's float32 product P·Qᵀ (inner dimension r) by
    ``γ_r·‖P‖_F·‖Q‖_F``; the cast to a 16-bit input dtype by ``u_out·‖x̂‖`` plus half its smallest
    subnormal per entry. ``p`` is the float32 P held in float64, ``q_norm`` = ‖Mᵀ·P‖ in float64 (whose
    own errors are 2^29 times smaller than the float32 terms and covered by them). Assumes float32
    matmuls really run in float32 (no TF32).
    """
    (n, d), u32, u_f = shape, _UNIT_ROUNDOFF[torch.float32], _UNIT_ROUNDOFF[factor_dtype]
    u_out, tiny = _OUTPUT_ROUNDING.get(out_dtype, (0.0, 0.0))  # float32, float64: no cast after the product
    p_f = float(p.norm())
    p_2 = float(torch.linalg.matrix_norm(p, 2)) if p.numel() else 0.0
    dq_matmul = _gamma(n, u32) * m_norm * p_f
    q32 = q_norm + dq_matmul  # ‖Q‖ as computed, at most
    dq_cast, dp_cast = u_f * q32, u_f * p_f
    factors = dp_cast * q32 * (1 + u_f) + p_2 * (dq_matmul + dq_cast)
    product = _gamma(r, u32) * p_f * q32 * (1 + u_f) ** 2
    before_cast = factors + product
    return before_cast + u_out * (p_2 * q_norm + before_cast) + tiny * math.sqrt(n * d)


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

    def _factors(self, m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, Q) of one power iteration from the current warm start, float32; the state is untouched."""
        p = torch.linalg.qr(m @ self._warm_start(m.shape[1], r, m.device)).Q
        return p, m.t() @ p

    def encode(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        _util.check_float(self.name, x)
        n, d = _matrix_shape(tuple(x.shape))
        r = self._r(n, d)
        m = x.detach().reshape(n, d).float()
        p, q = self._factors(m, r)
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

    def payload_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        n, d = _matrix_shape(tuple(shape))
        r = self._r(n, d)
        return packed_size([_util.meta_spec(shape), (self.factor_dtype, (n, r)), (self.factor_dtype, (d, r))])

    def error_bound(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> float:
        """``(‖M − P·Pᵀ·M‖ + ‖x − M‖ + rounding) / ‖x‖`` for the ``P`` the next message would carry."""
        x64 = x.detach().double()
        norm = float(x64.norm())
        if norm == 0.0:
            return 0.0
        n, d = _matrix_shape(tuple(x.shape))
        r = self._r(n, d)
        m = x.detach().reshape(n, d).float()
        p, _ = self._factors(m, r)
        m64, p64 = m.double(), p.double()
        q64 = m64.t() @ p64  # the Q of exact arithmetic from the float32 P
        residual = float((m64 - p64 @ q64.t()).norm())
        to_float32 = float((x64.reshape(n, d) - m64).norm())  # nonzero for float64 inputs only
        slack = _rounding_slack((n, d), r, self.factor_dtype, x.dtype, float(m64.norm()), p64, float(q64.norm()))
        return (residual + to_float32 + slack) / norm

    def state_dict(self) -> dict[str, Any]:
        return {"q": self._q if self._q is not None else torch.zeros(0)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        q = state["q"]
        self._q = q.clone() if q.numel() else None

    def reset(self) -> None:
        self._q = None

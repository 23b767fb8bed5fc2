"""``topk`` and ``randk``: send a fraction ``ratio`` of the entries, carry the rest to the next send.

Both keep ``k = ceil(ratio·numel)`` entries (at least 1) of ``v = x + r``, where ``r`` is the
error-feedback residual -- what earlier encodes on this codec instance left unsent (``error_feedback:
true``, default). After sending, ``r ← v − x̂``; over many steps the sum of what was sent tracks the
sum of the inputs to within the last residual. The residual lives on the sender only (the receiver
is stateless); it is dropped, not reshaped, when a message of a different shape comes along.
(In a pipeline the residual of one microbatch is added to the next one's tensor: that is the usual
error-feedback trade, and the reason it can be switched off.)

``topk`` keeps the ``k`` largest ``|v|``. Values travel in ``x``'s dtype; indices are sorted and
split into 64 Ki-entry chunks: each index is its low 16 bits (int16, 2 bytes) and each chunk sends
its count (int32). Bytes: ``k·(itemsize + 2) + 4·ceil(numel/65536)`` + header.
Bound: ``‖x̂ − v‖ ≤ sqrt(1 − k/n)·‖v‖`` (top-k keeps at least a k/n share of the energy), hence
``‖x̂ − x‖ ≤ sqrt(1 − k/n)·‖v‖ + ‖r‖``.

``randk`` keeps ``k`` entries chosen at random -- one uniformly in each of ``k`` equal strata of
the flattened tensor, so each entry with probability ~k/n (no rescaling: a baseline, not an
unbiased estimator). The indices are not sent: they are regenerated from ``seed`` and the message number,
which travels in the header (8 bytes). Bytes: ``k·itemsize`` + header. Bound: ``‖x̂ − x‖ ≤ ‖v‖ + ‖r‖``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowbw.compress import _util
from lowbw.compress.base import Codec, register_codec
from lowbw.compress.payload import pack, packed_size, unpack

_CHUNK = 1 << 16
_UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Sparsify(Codec):
    stateful = True

    def __init__(self, ratio: float = 0.01, error_feedback: bool = True, **params: Any):
        super().__init__(**params)
        self.ratio = _util.check_ratio(self.name, ratio)
        self.error_feedback = _util.check_bool(self.name, "error_feedback", error_feedback)
        self._residual: torch.Tensor | None = None

    def k(self, n: int) -> int:
        """Entries sent for a tensor of ``n`` entries."""
        return 0 if n == 0 else min(n, max(1, math.ceil(self.ratio * n)))

    # --- error feedback -------------------------------------------------------------------------
    def _residual_for(self, x: torch.Tensor) -> torch.Tensor | None:
        r = self._residual
        if not self.error_feedback or r is None or r.shape != x.shape:
            return None
        return r.to(device=x.device, dtype=_work_dtype(x.dtype))

    def _with_residual(self, x: torch.Tensor) -> torch.Tensor:
        """v = x + r as a fresh tensor (x is never written to)."""
        r = self._residual_for(x)
        v = x.detach().to(_work_dtype(x.dtype), copy=True)
        return v.add_(r) if r is not None else v

    def _keep_residual(self, v: torch.Tensor, idx: torch.Tensor, sent: torch.Tensor) -> None:
        if self.error_feedback:
            flat = v.view(-1)  # v is our own copy: the residual is v with the sent entries taken off
            if sent.dtype == v.dtype:  # sent exactly: nothing of those entries is left
                flat.index_fill_(0, idx, 0.0)
            else:
                flat[idx] -= sent.to(v.dtype)
            self._residual = v

    # --- Codec ----------------------------------------------------------------------------------
    def error_bound(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> float:
        xn = float(x.detach().double().norm())
        if xn == 0.0 and self._residual_for(x) is None:
            return 0.0
        r = self._residual_for(x)
        rn = float(r.double().norm()) if r is not None else 0.0
        vn = float(self._with_residual(x).double().norm())
        kept = self._kept_error_factor(x.numel()) + _UNIT_ROUNDOFF.get(x.dtype, 0.0)
        return (kept * vn + rn) / xn if xn else math.inf

    def state_dict(self) -> dict[str, Any]:
        r = self._residual
        return {"residual": r if r is not None else torch.zeros(0)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        r = state["residual"]
        self._residual = r.clone() if r.numel() else None

    def reset(self) -> None:
        self._residual = None

    def _kept_error_factor(self, n: int) -> float:
        raise NotImplementedError


@register_codec
class TopK(_Sparsify):
    """The ``ratio`` largest-magnitude entries of x + residual, with compact indices."""

    name = "topk"

    def encode(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        _util.check_float(self.name, x)
        v = self._with_residual(x)
        flat = v.view(-1)
        n = flat.numel()
        k = self.k(n)
        top = torch.topk(flat.abs(), k, sorted=False).indices
        mask = torch.zeros(n, dtype=torch.bool, device=x.device)
        mask[top] = True
        idx = mask.nonzero().squeeze(1)  # sorted, and cheaper than sorting `top`
        vals = flat[idx].to(x.dtype)
        low = (idx & 0xFFFF).to(torch.int16)  # wraps: 32768..65535 become negative, decode masks
        counts = torch.bincount(idx >> 16, minlength=self._chunks(n)).to(torch.int32)
        self._keep_residual(v, idx, vals)
        return pack([_util.meta(x), vals, low, counts])

    def decode(self, payload: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        m, vals, low, counts = unpack(payload)
        dtype, _, shape = _util.read_meta(m)
        high = torch.repeat_interleave(
            torch.arange(counts.numel(), device=payload.device), counts.to(torch.int64)
        )
        idx = (high << 16) | (low.to(torch.int64) & 0xFFFF)
        out = torch.zeros(_util.numel(shape), dtype=dtype, device=payload.device)
        out[idx] = vals.to(dtype)
        return out.view(shape)

    @staticmethod
    def _chunks(n: int) -> int:
        return max(1, -(-n // _CHUNK))

    def payload_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        n = _util.numel(shape)
        k = self.k(n)
        return packed_size(
            [_util.meta_spec(shape), (dtype, (k,)), (torch.int16, (k,)), (torch.int32, (self._chunks(n),))]
        )

    def _kept_error_factor(self, n: int) -> float:
        return math.sqrt(max(0.0, 1.0 - self.k(n) / n)) if n else 0.0


@register_codec
class RandK(_Sparsify):
    """``ratio`` of the entries of x + residual chosen at random; indices regenerated from the seed."""

    name = "randk"

    def __init__(self, ratio: float = 0.01, error_feedback: bool = True, seed: int = 0, **params: Any):
        super().__init__(ratio=ratio, error_feedback=error_feedback, **params)
        self.seed = _util.check_int(self.name, "seed", seed, 0, "seed of the index generator")
        self._step = 0

    def _indices(self, n: int, step: int, device: torch.device) -> torch.Tensor:
        """One uniformly random entry in each of k equal strata of the flattened tensor: k distinct
        sorted indices, every entry kept with probability ~k/n, O(k) work (a permutation is O(n))."""
        k = self.k(n)
        if k == 0:
            return torch.zeros(0, dtype=torch.int64, device=device)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % (2**63))
        bounds = torch.arange(k + 1, dtype=torch.int64) * n // k
        width = (bounds[1:] - bounds[:-1]).double()
        offset = (torch.rand(k, generator=g, dtype=torch.float64) * width).long()
        return (bounds[:-1] + offset).to(device)

    def encode(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        _util.check_float(self.name, x)
        v = self._with_residual(x)
        flat = v.view(-1)
        step = self._step
        self._step += 1
        idx = self._indices(flat.numel(), step, x.device)
        vals = flat[idx].to(x.dtype)
        self._keep_residual(v, idx, vals)
        return pack([_util.meta(x, step), vals])

    def decode(self, payload: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        m, vals = unpack(payload)
        dtype, (step,), shape = _util.read_meta(m, n_extra=1)
        n = _util.numel(shape)
        out = torch.zeros(n, dtype=dtype, device=payload.device)
        out[self._indices(n, step, payload.device)] = vals.to(dtype)
        return out.view(shape)

    def payload_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return packed_size([_util.meta_spec(shape, 1), (dtype, (self.k(_util.numel(shape)),))])

    def _kept_error_factor(self, n: int) -> float:
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "step": torch.tensor(self._step, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._step = int(state["step"])

    def reset(self) -> None:
        super().reset()
        self._step = 0

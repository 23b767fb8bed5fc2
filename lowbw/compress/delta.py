"""``aqsgd``: AQ-SGD activation deltas (Wang et al. 2022, arXiv:2206.01299).

Sender and receiver each keep, per training sample id, the last activation *as the receiver
reconstructed it*. The first time a sample is seen its row goes out quantized with ``base_bits``;
afterwards only the quantized change ``x − cache`` goes out, with ``bits`` (default 4). Both ends
then store the same reconstruction, computed with the same float32 operations from the same
payload, so the caches stay identical without ever comparing them. Each message also carries one
``new/seen`` flag per row (1 byte each): the receiver checks it against its own cache and raises
if the two ends have drifted apart (e.g. one was reset or restored from another checkpoint).

Rows are dim 0 of ``x`` and ``sample_ids[i]`` names row ``i``; the cache holds one ``x.shape[1:]``
row per sample, in ``cache_dtype``. ``sample_ids=None`` (e.g. evaluation) bypasses the cache: every
row goes out with ``base_bits`` and nothing is stored. A sample appearing twice in one microbatch
is coded against the cache as it was before the message; the last occurrence is stored.

Bytes: the ``quant`` formula for the new rows with ``base_bits`` plus the ``quant`` formula for the
seen rows with ``bits`` (same ``block``/``symmetric``/``scale_dtype``), plus ``batch`` flag bytes and
the headers. :meth:`AQSGD.estimate_ratio` gives the steady state (every sample seen before).
Bound: per row the ``quant`` bound of whatever was quantized (the row, or its delta -- small once
training settles, which is the point), plus float32 rounding of ``cache + delta``.
Memory: :meth:`AQSGD.cache_bytes` -- ``samples × row numel × sizeof(cache_dtype)`` + 8 bytes a
sample id, on the device of ``x``, on *both* ends.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowbw.compress import _util
from lowbw.compress.base import Codec, register_codec
from lowbw.compress.payload import pack, packed_size, unpack
from lowbw.compress.quantize import Quantizer

_OUT_U = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@register_codec
class AQSGD(Codec):
    """Per-sample activation cache on both ends; sends quantized deltas after a sample's first visit."""

    name = "aqsgd"
    stateful = True
    # Deltas against a per-sample cache pay off because a sample's activations change slowly between
    # epochs; its gradients do not (AQ-SGD quantizes gradients directly, Wang et al. 2022, sec. 3).
    directions = ("fwd",)

    def __init__(
        self,
        bits: int = 4,
        base_bits: int = 8,
        block: int = 64,
        symmetric: bool = False,
        scale_dtype: str = "bfloat16",
        cache_dtype: str = "float32",
        **params: Any,
    ):
        super().__init__(**params)
        bits = _util.check_choice(self.name, "bits", bits, (2, 4, 8))
        base_bits = _util.check_choice(self.name, "base_bits", base_bits, (2, 4, 8))
        block = _util.check_int(self.name, "block", block, 0, "entries per scale; 0 = one scale per row")
        symmetric = _util.check_bool(self.name, "symmetric", symmetric)
        sd = _util.check_dtype(self.name, "scale_dtype", scale_dtype)
        self.cache_dtype = _util.check_dtype(self.name, "cache_dtype", cache_dtype)
        self.delta_q = Quantizer(bits, block, symmetric, sd)
        self.base_q = Quantizer(base_bits, block, symmetric, sd)
        self.reset()

    # --- cache ----------------------------------------------------------------------------------
    def reset(self) -> None:
        self._slot: dict[int, int] = {}  # sample id -> row of self._cache, in insertion order
        self._cache: torch.Tensor | None = None  # [capacity, *row shape], cache_dtype
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def cache_bytes(self) -> int:
        """Bytes this end holds for the cache (allocated rows + 8 bytes per sample id)."""
        c = self._cache
        return (c.numel() * c.element_size() if c is not None else 0) + 8 * len(self._slot)

    def cached_samples(self) -> int:
        return len(self._slot)

    def _lookup(self, x: torch.Tensor, sample_ids: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
        """(slot per row or -1, ids as ints, whether each row is the last with its id)."""
        if sample_ids.shape != (x.shape[0],):
            raise ValueError(
                f"aqsgd: sample_ids has shape {tuple(sample_ids.shape)}, expected ({x.shape[0]},) -- one id per row of x"
            )
        if self._cache is not None and self._cache.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"aqsgd: cached rows have shape {tuple(self._cache.shape[1:])}, got rows of {tuple(x.shape[1:])}; "
                "pass sample_ids=None for tensors that should bypass the cache, or reset() it"
            )
        ids = [int(i) for i in sample_ids.tolist()]
        slots = torch.tensor([self._slot.get(i, -1) for i in ids], dtype=torch.int64)
        last_pos = {i: p for p, i in enumerate(ids)}
        is_last = [last_pos[i] == p for p, i in enumerate(ids)]
        return slots, ids, is_last

    def _store(self, xhat: torch.Tensor, ids: list[int], is_last: list[int]) -> None:
        rows = [p for p, last in enumerate(is_last) if last]
        for p in rows:
            self._slot.setdefault(ids[p], len(self._slot))
        need = len(self._slot)
        c = self._cache
        if c is None or c.shape[0] < need:
            cap = max(need, 2 * (c.shape[0] if c is not None else 0), 16)
            grown = torch.empty((cap, *xhat.shape[1:]), dtype=self.cache_dtype, device=xhat.device)
            if c is not None:
                grown[: c.shape[0]] = c.to(xhat.device)
            self._cache = c = grown
        if c.device != xhat.device:
            self._cache = c = c.to(xhat.device)
        dest = torch.tensor([self._slot[ids[p]] for p in rows], dtype=torch.int64, device=c.device)
        src = torch.tensor(rows, dtype=torch.int64, device=c.device)
        c[dest] = xhat[src].to(self.cache_dtype)

    # --- coding ---------------------------------------------------------------------------------
    def _split(self, x: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new = new.to(x.device)
        return x[new], x[~new]

    def _cached(self, slots: torch.Tensor, new: torch.Tensor, row: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """float32 cached rows of the samples seen before, in batch order."""
        seen = slots[~new]
        if self._cache is None:  # then nothing has been seen: seen is empty
            return torch.zeros((seen.numel(), *row), dtype=torch.float32, device=device)
        return self._cache[seen.to(self._cache.device)].to(device=device, dtype=torch.float32)

    def _reconstruct(
        self, shape: tuple[int, ...], new: torch.Tensor, x_new: torch.Tensor, x_seen: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        out = torch.empty(shape, dtype=torch.float32, device=device)
        new = new.to(device)
        out[new] = x_new
        out[~new] = x_seen
        return out

    def encode(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        _util.check_float(self.name, x)
        if x.dim() == 0:
            raise ValueError("aqsgd: x needs a batch dimension (dim 0 = samples)")
        xf = x.detach().float()
        if sample_ids is None:
            payload = pack([_util.meta(x), torch.zeros(0, dtype=torch.bool, device=x.device),
                            *self.base_q.quantize(xf), *self.delta_q.quantize(xf[:0])])
            self._last = (payload, None)
            return payload
        slots, ids, is_last = self._lookup(x, sample_ids)
        new = slots < 0
        x_new, x_seen = self._split(xf, new)
        cached = self._cached(slots, new, tuple(x.shape[1:]), x.device)
        base = self.base_q.quantize(x_new)
        delta = self.delta_q.quantize(x_seen - cached)
        # the receiver's reconstruction, computed here the way decode computes it
        xhat = self._reconstruct(
            tuple(x.shape), new,
            self.base_q.dequantize(*base, tuple(x_new.shape)),
            cached + self.delta_q.dequantize(*delta, tuple(x_seen.shape)),
            x.device,
        )
        self._store(xhat, ids, is_last)
        payload = pack([_util.meta(x), new.to(x.device), *base, *delta])
        self._last = (payload, xhat)
        return payload

    def decode(self, payload: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        m, new_sent, base_stats, base_codes, d_stats, d_codes = unpack(payload)
        dtype, _, shape = _util.read_meta(m)
        dev = payload.device
        if new_sent.numel() == 0:  # cache bypassed
            if sample_ids is not None:
                raise RuntimeError("aqsgd: the sender bypassed the cache (no sample_ids) but the receiver got sample_ids")
            return self.base_q.dequantize(base_stats, base_codes, shape).to(dtype)
        if sample_ids is None:
            raise RuntimeError("aqsgd: the sender used its per-sample cache, so decode needs the same sample_ids")
        slots, ids, is_last = self._lookup(torch.empty(shape, device="meta"), sample_ids)
        new = slots < 0
        if not torch.equal(new, new_sent.cpu()):
            raise RuntimeError(
                "aqsgd: sender and receiver caches are out of step (they disagree on which samples were "
                "seen before); reset() or restore both ends from the same checkpoint"
            )
        n_new = int(new.sum())
        row = tuple(shape[1:])
        cached = self._cached(slots, new, row, dev)
        xhat = self._reconstruct(
            shape, new,
            self.base_q.dequantize(base_stats, base_codes, (n_new, *row)),
            cached + self.delta_q.dequantize(d_stats, d_codes, (shape[0] - n_new, *row)),
            dev,
        )
        self._store(xhat, ids, is_last)
        return xhat.to(dtype)

    def reconstruction(self, payload: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        """What the receiver decodes from ``payload`` -- which must be this instance's latest encode."""
        if self._last is None or self._last[0] is not payload:
            raise ValueError("aqsgd: reconstruction() works only for the payload of the latest encode()")
        m, _, base_stats, base_codes, _, _ = unpack(payload)
        dtype, _, shape = _util.read_meta(m)
        if self._last[1] is None:  # cache bypassed: decoding is stateless
            return self.base_q.dequantize(base_stats, base_codes, shape).to(dtype)
        return self._last[1].to(dtype)

    # --- sizes and bounds -----------------------------------------------------------------------
    def payload_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """None: the length depends on how many rows the cache has seen (:meth:`payload_bytes`)."""
        return None

    def payload_bytes(self, shape: tuple[int, ...], n_new: int) -> int:
        """Exact payload size for a batch of ``shape`` of which ``n_new`` rows are first sightings."""
        row = tuple(shape[1:])
        return packed_size([
            _util.meta_spec(shape), (torch.bool, (shape[0],)),
            *self.base_q.specs((n_new, *row)), *self.delta_q.specs((shape[0] - n_new, *row)),
        ])

    def estimate_ratio(self, shape: tuple[int, ...], dtype: torch.dtype) -> float:
        """Steady state: every sample in the batch seen before (the first epoch costs ``base_bits``)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return _util.numel(shape) * itemsize / self.payload_bytes(tuple(shape), 0)

    def error_bound(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> float:
        xf = x.detach().float()
        norm = float(xf.double().norm())
        if sample_ids is None:
            err2 = self.base_q.err_sq_bound(xf)
        else:
            slots, _, _ = self._lookup(x, sample_ids)
            new = slots < 0
            x_new, x_seen = self._split(xf, new)
            err2 = self.base_q.err_sq_bound(x_new)
            if x_seen.numel():
                err2 += self.delta_q.err_sq_bound(x_seen - self._cached(slots, new, tuple(x.shape[1:]), x.device))
        if norm == 0.0:
            return 0.0 if err2 == 0.0 else math.inf
        return math.sqrt(err2) / norm + 2.0**-22 + _OUT_U.get(x.dtype, 0.0)

    # --- checkpoint -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        n = len(self._slot)
        ids = torch.tensor(list(self._slot), dtype=torch.int64)
        cache = self._cache[:n].clone() if self._cache is not None else torch.zeros(0, dtype=self.cache_dtype)
        return {"ids": ids, "cache": cache}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ids, cache = state["ids"], state["cache"]
        if ids.numel() != (cache.shape[0] if cache.dim() else 0):
            raise ValueError(f"aqsgd state: {ids.numel()} ids but {cache.shape[0]} cached rows")
        self.reset()
        self._slot = {int(i): p for p, i in enumerate(ids.tolist())}
        self._cache = cache.to(self.cache_dtype).clone() if ids.numel() else None

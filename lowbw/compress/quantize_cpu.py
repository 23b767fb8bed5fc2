"""The CPU path of :class:`~lowbw.compress.quantize.Quantizer`: the same arithmetic, fewer passes and calls.

Bit-identical to the torch path (``Quantizer.quantize_into_torch`` / ``dequantize_torch``, which
serves other devices; tests/test_codecs.py compares the two payload byte by payload byte and output
bit by bit). Encode is five passes over the tensor (min, max, subtract, multiply, add ½ and cast)
and decode three (cast, multiply, add) -- the float32 operations of the torch path, in its order,
so that rounding is the same --, and around them as few calls as possible: with the caches cold,
as when a codec runs between a model's layers, a torch call costs ~20 µs (scripts/bench_codecs.py).

- Payloads are written and read through numpy views of their bytes (``Quant.encode`` copies a
  header kept per shape, :func:`~lowbw.compress.payload.unpack_numpy` reads one).
- The per-block statistics (``n/block`` numbers) go through numpy; rounding them outward to
  bfloat16 is integer arithmetic on the float32 bit pattern (bfloat16 is its upper half) instead of
  a cast, a compare, a ``nextafter`` and a ``where`` per row.
- ``min`` and ``max`` are two reductions (torch's ``aminmax`` over 64-entry rows is ~8x slower
  than ``amin`` + ``amax`` on this CPU), and ``(x − min)·(1/step)`` goes into a float32 scratch
  buffer, both kept per thread and reused between calls (a fresh 2 MiB tensor costs page faults);
  numpy adds ½ and casts to ``uint8`` in one pass into the payload (torch's float -> uint8 copy is
  ~3x slower).

The scratch buffer is as large as the largest tensor quantized on that thread (float32, plus two
floats a block) and lives as long as the thread.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Optional

import numpy as np
import torch

#: The ``lowbw.compress.quantize.Quantizer`` whose settings and torch helpers the functions here take
#: as ``q`` (not imported: quantize.py imports this module).
Quantizer = Any

#: A payload's (min, max) bfloat16 pair read as one uint32 has min in the low half on little-endian CPUs.
_LITTLE = sys.byteorder == "little"
_SCRATCH = threading.local()
_MAX_SHAPES = 16  # views kept per thread; more shapes than this and the views are rebuilt


def _silent() -> np.errstate:
    """inf and nan on the way (1/0, max − min past float32's range, non-finite entries) go unreported, as in torch."""
    return np.errstate(over="ignore", invalid="ignore", divide="ignore")  # one per use: it cannot be re-entered


def _scratch(nb: int, b: int) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, torch.Tensor, np.ndarray]:
    """This thread's buffers for ``nb`` blocks of ``b``: ``t`` ``[nb, b]`` (torch and numpy views of the
    same float32 memory), the min and max rows ``[nb]`` and both as one numpy ``[2, nb]``. Contents undefined."""
    views = getattr(_SCRATCH, "views", None)
    if views is None:
        views = _SCRATCH.views = {}
        _SCRATCH.buf = torch.empty(0, dtype=torch.float32)
    got = views.get((nb, b))
    if got is None:
        need = nb * b + 2 * nb
        if _SCRATCH.buf.numel() < need or len(views) >= _MAX_SHAPES:
            views.clear()
            _SCRATCH.buf = torch.empty(max(need, _SCRATCH.buf.numel()), dtype=torch.float32)
        t = _SCRATCH.buf[: nb * b].view(nb, b)
        rows = _SCRATCH.buf[nb * b : need].view(2, nb)
        got = views[nb, b] = (t, t.numpy(), rows[0], rows[1], rows.numpy())
    return got


def bf16_outward(s: np.ndarray, up_rows: slice) -> np.ndarray:
    """Finite float32 ``s`` ``[k, m]`` rounded outward to bfloat16 -- rows ``up_rows`` toward +inf, the
    others toward −inf --, as int32 float32 bit patterns whose low 16 bits are zero.

    bfloat16 is the upper half of float32, so clearing the low half rounds toward zero, and adding
    0xFFFF first rounds away from zero (a carry runs into the exponent, up to inf). Away from zero is
    down for a negative value and up for a positive one: add 0xFFFF where the sign bit says so."""
    u = s.view(np.int32)
    m = u >> 31  # -1 for a negative value, 0 otherwise
    m &= 0xFFFF
    m[up_rows] ^= 0xFFFF
    m += u
    m &= -0x10000
    return m


def _write_bf16(stats: np.ndarray, m: np.ndarray) -> None:
    """Store ``m`` (:func:`bf16_outward`'s ``[k, n_blocks]``) as a payload's bfloat16 stats (bytes of
    ``[n_blocks, 2]`` (min, max) pairs, or of ``[n_blocks]``)."""
    w = m.view(np.uint32)
    if len(w) == 1:
        np.copyto(stats.view(np.uint16), w[0] >> 16, casting="unsafe")
    elif _LITTLE:  # each (min, max) pair as one uint32: max in the high half, min in the low
        np.bitwise_or(w[1], w[0] >> 16, out=stats.view(np.uint32))
    else:
        np.copyto(stats.view(np.uint16).reshape(-1, 2), (w >> 16).T, casting="unsafe")


def stored_stats(q: Quantizer, stats: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float32 ``[k, n_blocks]`` values of a payload's stats (their bytes, of ``dtype``)."""
    k = 1 if q.symmetric else 2
    if dtype != torch.bfloat16:
        return np.ascontiguousarray(torch.from_numpy(stats).view(dtype).float().numpy().reshape(-1, k).T)
    if k == 1:
        return (stats.view(np.uint16).astype(np.uint32) << 16).view(np.float32)[None]
    if not _LITTLE:
        return (stats.view(np.uint16).reshape(-1, 2).T.astype(np.uint32) << 16).view(np.float32)
    w = stats.view(np.uint32)  # (min, max) pairs: min in the low half, max in the high
    out = np.empty((2, w.size), dtype=np.uint32)
    np.left_shift(w, 16, out=out[0])
    np.bitwise_and(w, 0xFFFF0000, out=out[1])
    return out.view(np.float32)


def _block_stats(q: Quantizer, xb: torch.Tensor, stats: np.ndarray, lo: torch.Tensor, hi: torch.Tensor,
                 s: np.ndarray) -> np.ndarray:
    """Write ``xb``'s rounded-out block stats into ``stats`` (bytes); return their stored values, float32
    ``[k, n_blocks]`` (rows min, max, or one row absmax). ``lo``, ``hi``: scratch rows, ``s`` both as numpy."""
    torch.amin(xb, 1, out=lo)
    torch.amax(xb, 1, out=hi)
    if q.symmetric:  # max(−min, max) is the absmax exactly; abs() turns a −0.0 into the +0.0 of abs().amax()
        s = np.abs(np.maximum(-s[0], s[1]))[None]
    # one pass: a nan or inf entry makes the sum non-finite (a sum past float32's range only sends
    # finite stats down the slower path, which gives the same bits)
    finite = bool(np.isfinite(s.sum()))
    if finite and q.scale_dtype == torch.bfloat16:
        m = bf16_outward(s, up_rows=slice(0, 1) if q.symmetric else slice(1, 2))
        _write_bf16(stats, m)
        return m.view(np.float32)
    st = torch.from_numpy(stats).view(q.scale_dtype).view(-1, *([] if q.symmetric else [2]))
    if not finite:  # inf or nan in a block: exactly the torch path, whose cast decides the bits
        st.copy_(q._stats(xb))
    elif q.symmetric:
        st.copy_(q._round_out(torch.from_numpy(s[0]), up=True))
    else:
        st.copy_(torch.stack([q._round_out(lo, up=False), q._round_out(hi, up=True)], dim=1))
    return stored_stats(q, stats, q.scale_dtype)


def affine(q: Quantizer, sf: np.ndarray) -> tuple[Optional[np.ndarray], np.ndarray]:
    """(offset or None for symmetric, step) per block: ``Quantizer._affine``'s float32 arithmetic."""
    if q.symmetric:
        return None, sf[0] / np.float32(q.half)
    return sf[0], (sf[1] - sf[0]) / np.float32(q.levels)


def _blocks(q: Quantizer, x: torch.Tensor, n: int, b: int, nb: int) -> torch.Tensor:
    if x.dtype == torch.float32 and n == nb * b and x.is_contiguous():
        return (x.detach() if x.requires_grad else x).view(nb, b)
    return q._blocks(x)


def quantize(q: Quantizer, x: torch.Tensor, stats: np.ndarray, codes: np.ndarray) -> None:
    """``Quantizer.quantize_into`` for a CPU tensor ``x`` (at least one entry) into the bytes of its
    stats and codes (uint8 numpy views of a payload)."""
    n, b, nb, nbytes = q._geometry(tuple(x.shape))
    xb = _blocks(q, x, n, b, nb)
    t, tn, lo, hi, s = _scratch(nb, b)
    with _silent():
        off, step = affine(q, _block_stats(q, xb, stats, lo, hi, s))
        inv = np.float32(1.0) / step
        finite = bool(np.isfinite(inv.sum()))
        if not finite:  # the torch path's 1/step where step > 0, else 0; is it all finite then?
            inv[~(step > 0)] = 0.0
            finite = bool(np.isfinite(inv).all())
    inv_t = torch.from_numpy(inv[:, None])
    if off is None:
        torch.mul(xb, inv_t, out=t)
    else:
        torch.sub(xb, torch.from_numpy(off[:, None]), out=t).mul_(inv_t)
    shift, top = (q.half + 0.5, 2 * q.half) if q.symmetric else (0.5, q.levels)
    whole = codes.reshape(nb, b) if q.per_byte == 1 else np.empty((nb, b), dtype=np.uint8)
    if finite:
        # round half up = truncate(t + 1/2); t + shift lies in [1/2, top + 1) because the stats cover the block
        # a non-finite input makes its block's scale 0 and t NaN: its code is the torch path's (tested), numpy's
        # warning about it only noise in a run whose activations blow up
        with np.errstate(invalid="ignore"):
            np.add(tn, np.float32(shift), out=whole, casting="unsafe")
    else:
        torch.from_numpy(whole).copy_(t.add_(shift).clamp_(0, top))
    if q.per_byte > 1:
        np.copyto(codes, q._pack_bits(torch.from_numpy(whole), nbytes).numpy())


def dequantize(q: Quantizer, stats: np.ndarray, stats_dtype: torch.dtype, codes: np.ndarray,
               shape: tuple[int, ...]) -> torch.Tensor:
    """``Quantizer.dequantize`` from the bytes of a payload's stats (of ``stats_dtype``) and codes
    (uint8 numpy views), for a ``shape`` of at least one entry."""
    n, b, nb, _ = q._geometry(shape)
    with _silent():
        off, step = affine(q, stored_stats(q, stats, stats_dtype))
    y = torch.empty((nb, b), dtype=torch.float32)
    if q.per_byte == 1:
        y.copy_(torch.from_numpy(codes.reshape(nb, b)))
    else:
        y.copy_(q._unpack_bits(torch.from_numpy(codes), nb * b).view(nb, b))
    if q.symmetric:
        y.sub_(q.half)
    y.mul_(torch.from_numpy(step[:, None]))
    if off is not None:
        y.add_(torch.from_numpy(off[:, None]))
    elif not (step > 0).all():  # the torch path adds a zero offset: -0.0 (a code below H times 0) -> +0.0
        y.add_(0.0)
    return y.view(shape) if n == nb * b else y.view(-1)[:n].view(shape)

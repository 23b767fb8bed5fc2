"""The CPU path of :class:`~lowbw.compress.quantize.Quantizer`: the same arithmetic, fewer passes and calls.

Bit-identical to the generic torch path (``Quantizer.quantize_into_torch`` / ``dequantize_torch``,
which still serves other devices; tests/test_codecs.py compares the two payload byte by payload
byte and output bit by bit). What makes it faster, measured with scripts/bench_codecs.py:

- the per-block statistics (``n/block`` numbers) go through numpy, whose calls cost a few µs where
  a torch op on a small tensor costs 10-50 µs; rounding them outward to bfloat16 is integer
  arithmetic on the float32 bit pattern (bfloat16 is its upper half) instead of a cast, a compare,
  a ``nextafter`` and a ``where`` per row;
- ``min`` and ``max`` are two reductions into one preallocated ``[2, n_blocks]`` buffer (torch's
  ``aminmax`` over 64-entry rows is ~8x slower than ``amin`` + ``amax`` on this CPU);
- ``(x − min)·(1/step)`` is computed into a float32 scratch buffer kept per thread and reused
  between calls (a fresh 2 MiB tensor costs its page faults on every call), then numpy adds ½ and
  casts to ``uint8`` in one pass into the payload;
- decode converts the codes into the output tensor and scales it in place: three passes, no
  temporaries.

The scratch buffer is as large as the largest tensor quantized on that thread (float32) and lives
as long as the thread.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

if TYPE_CHECKING:  # annotations only: quantize.py imports this module
    from lowbw.compress.quantize import Quantizer

_SCRATCH = threading.local()
_LOW16 = np.uint32(0xFFFF)
_SIGN32 = np.uint32(0x80000000)
_SIGN16 = np.uint16(0x8000)


def _scratch(n: int) -> torch.Tensor:
    """A float32 buffer of ``n`` entries, this thread's, reused between calls (contents undefined)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH.buf = torch.empty(n, dtype=torch.float32)
    return buf[:n]


def bf16_outward(s: np.ndarray, down_rows: int) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of finite float32 ``s`` ``[k, m]``, the first ``down_rows`` rows
    rounded toward −inf and the others toward +inf. Overwrites ``s``.

    bfloat16 is the upper 16 bits of float32, so truncating the bit pattern rounds toward zero and
    adding one unit to it (the carry runs into the exponent, up to inf) rounds away from zero. Rows
    rounded down are negated first, rounded up, and negated back through the sign bit."""
    if down_rows:
        np.negative(s[:down_rows], out=s[:down_rows])
    u = s.view(np.uint32)
    r = (u >> 16).astype(np.uint16)
    r += ((u & _LOW16) != 0) & (u < _SIGN32)  # a positive value with lower bits set: one unit up
    if down_rows:
        r[:down_rows] ^= _SIGN16
    return r


def bf16_values(r: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns ``r`` (uint16, any shape)."""
    return (r.astype(np.uint32) << 16).view(np.float32)


def _block_stats(q: Quantizer, xb: torch.Tensor, stats: torch.Tensor) -> np.ndarray:
    """Write ``xb``'s rounded-out block stats into ``stats``; return their stored values, float32
    ``[k, n_blocks]`` (rows min, max, or one row absmax)."""
    nb = xb.shape[0]
    s = torch.empty((2, nb), dtype=torch.float32)
    torch.amin(xb, 1, out=s[0])
    torch.amax(xb, 1, out=s[1])
    sn = s.numpy()
    if q.symmetric:  # max(−min, max) is the absmax exactly; abs() turns a −0.0 into the +0.0 of abs().amax()
        sn = np.abs(np.maximum(-sn[0], sn[1]))[None]
    if not np.isfinite(sn).all():  # inf or nan in a block: the generic path, whose cast decides the bits
        stats.copy_(q._stats(xb))
        return stored_stats(q, stats)
    if q.scale_dtype == torch.bfloat16:
        r = bf16_outward(sn, down_rows=0 if q.symmetric else 1)
        stats.view(torch.int16).numpy().reshape(nb, -1)[...] = r.T.view(np.int16)
        return bf16_values(r)
    st = torch.from_numpy(sn)
    if q.symmetric:
        stats.copy_(q._round_out(st[0], up=True))
    else:
        stats.copy_(torch.stack([q._round_out(st[0], up=False), q._round_out(st[1], up=True)], dim=1))
    return stored_stats(q, stats)


def stored_stats(q: Quantizer, stats: torch.Tensor) -> np.ndarray:
    """float32 ``[k, n_blocks]`` values of the stats as stored in a payload."""
    nb = stats.shape[0]
    if stats.dtype == torch.bfloat16:
        return bf16_values(stats.view(torch.int16).numpy().view(np.uint16).reshape(nb, -1).T)
    return np.ascontiguousarray(stats.float().numpy().reshape(nb, -1).T)


def affine(q: Quantizer, sf: np.ndarray) -> tuple[Optional[np.ndarray], np.ndarray]:
    """(offset or None for symmetric, step) per block: ``Quantizer._affine``'s float32 arithmetic."""
    if q.symmetric:
        return None, sf[0] / np.float32(q.half)
    return sf[0], (sf[1] - sf[0]) / np.float32(q.levels)


def quantize_into(q: Quantizer, x: torch.Tensor, stats: torch.Tensor, codes: torch.Tensor) -> None:
    """``Quantizer.quantize_into`` for a CPU tensor ``x`` (at least one entry)."""
    _, b, nb, nbytes = q._geometry(tuple(x.shape))
    xb = q._blocks(x)
    off, step = affine(q, _block_stats(q, xb, stats))
    inv = np.zeros_like(step)
    np.divide(np.float32(1.0), step, out=inv, where=step > 0)
    inv_t = torch.from_numpy(inv).unsqueeze(1)
    t = _scratch(nb * b).view(nb, b)
    if off is None:
        torch.mul(xb, inv_t, out=t)
    else:
        torch.sub(xb, torch.from_numpy(off).unsqueeze(1), out=t).mul_(inv_t)
    shift, top = (q.half + 0.5, 2 * q.half) if q.symmetric else (0.5, q.levels)
    whole = codes if q.per_byte == 1 else torch.empty((nb, b), dtype=torch.uint8)
    if np.isfinite(inv).all():
        # round half up = truncate(t + 1/2): numpy adds and casts in one pass (torch's float -> uint8
        # copy is ~3x slower); t + shift lies in [1/2, top + 1) because the stats cover the block
        np.add(t.numpy(), np.float32(shift), out=whole.numpy().reshape(nb, b), casting="unsafe")
    else:
        whole.view(nb, b).copy_(t.add_(shift).clamp_(0, top))
    if q.per_byte > 1:
        codes.copy_(q._pack_bits(whole, nbytes))


def dequantize(q: Quantizer, stats: torch.Tensor, codes: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``Quantizer.dequantize`` for CPU ``stats`` and ``codes`` (at least one entry)."""
    n, b, nb, _ = q._geometry(shape)
    off, step = affine(q, stored_stats(q, stats))
    y = torch.empty((nb, b), dtype=torch.float32)
    y.copy_(q._unpack_bits(codes, nb * b).view(nb, b))
    if q.symmetric:
        y.sub_(q.half)
    y.mul_(torch.from_numpy(step).unsqueeze(1))
    if off is not None:
        y.add_(torch.from_numpy(off).unsqueeze(1))
    elif not (step > 0).all():  # the generic path adds a zero offset: -0.0 (a code below H times 0) -> +0.0
        y.add_(0.0)
    return y.view(-1)[:n].view(shape)

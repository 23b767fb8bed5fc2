"""``quant`` (with aliases ``int8``, ``int4``, ``int2``): blockwise uniform quantization, bit-packed.

The tensor is flattened and cut into blocks of ``block`` consecutive entries (``block: 0`` = one
block per row of the last dim, i.e. per-row scales). Each block stores two numbers in
``scale_dtype`` -- its min and max (asymmetric, default), or one, its absmax (``symmetric: true``) --
rounded *outward* so the block's range is covered exactly. Codes are ``bits``-bit unsigned integers
packed ``8/bits`` to a byte: 4-bit really is half a byte per entry, 2-bit a quarter.

Levels: asymmetric ``L = 2^bits − 1`` steps between min and max, ``step = (max − min)/L``;
symmetric ``2^bits − 1`` levels ``{−H..H}·step``, ``H = 2^(bits−1) − 1``, ``step = absmax/H``
(so symmetric 2-bit has the three levels −a, 0, a).

Bytes: ``ceil(n_pad·bits/8)`` codes + ``n_blocks·k·sizeof(scale_dtype)`` (k = 2 asymmetric, 1
symmetric), ``n_blocks = ceil(numel/B)``, ``n_pad = n_blocks·B`` (rounded up to a whole byte),
plus the header (payload layout, an int64 ``[dtype, *shape]``), each part padded to 8 bytes.

Error bound (tested): every entry is within ``step_b·(1/2 + 2⁻¹²) + 2⁻²¹·absmax_b`` of the input,
``step_b`` from the *stored* block stats (the second and third terms cover float32 arithmetic). So
``‖x̂ − x‖ ≤ sqrt(Σ_b n_b·e_b²)`` (:meth:`Quant.error_bound` computes it); data-independently,
``‖x̂ − x‖/‖x‖ ≤ ~sqrt(B)/(2H)`` symmetric and ``~sqrt(B)/L`` asymmetric. Computation is in float32.
Stateless. ``scale_dtype: float16`` overflows past ±65504; the default bfloat16 has float32's range.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch

from lowbw.compress import _util, quantize_cpu
from lowbw.compress.base import Codec, register_codec
from lowbw.compress.payload import _CODE as _DTYPE_CODE
from lowbw.compress.payload import layout, pack_layout, packed_size, unpack, unpack_numpy

_NEG_INF = float("-inf")
_POS_INF = float("inf")


class Quantizer:
    """The tensor-level quantizer behind ``quant`` (and AQ-SGD's deltas). Stateless."""

    def __init__(self, bits: int, block: int, symmetric: bool, scale_dtype: torch.dtype):
        self.bits, self.block, self.symmetric, self.scale_dtype = bits, block, symmetric, scale_dtype
        self.per_byte = 8 // bits
        self.levels = 2**bits - 1  # asymmetric steps
        self.half = 2 ** (bits - 1) - 1  # symmetric: codes -half..half

    # --- geometry -------------------------------------------------------------------------------
    def _block(self, shape: tuple[int, ...]) -> int:
        if self.block:
            return self.block
        return max(int(shape[-1]), 1) if len(shape) else 1

    def _geometry(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(numel, block, n_blocks, code bytes)."""
        n = _util.numel(shape)
        b = self._block(shape)
        nb = -(-n // b)
        n_codes = -(-(nb * b) // self.per_byte) * self.per_byte
        return n, b, nb, n_codes // self.per_byte

    def specs(self, shape: tuple[int, ...]) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        _, _, nb, nbytes = self._geometry(shape)
        stats = (nb,) if self.symmetric else (nb, 2)
        return [(self.scale_dtype, stats), (torch.uint8, (nbytes,))]

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        n, b, nb, _ = self._geometry(tuple(x.shape))
        flat = x.detach().reshape(-1).float()
        if nb * b != n:  # pad by repeating the last entry: leaves the last block's range unchanged
            flat = torch.cat([flat, flat[-1:].expand(nb * b - n)])
        return flat.view(nb, b)

    # --- stats ----------------------------------------------------------------------------------
    def _round_out(self, v: torch.Tensor, up: bool) -> torch.Tensor:
        r = v.to(self.scale_dtype)
        wrong = r.float() < v if up else r.float() > v
        toward = torch.full_like(r, _POS_INF if up else _NEG_INF)
        return torch.where(wrong, torch.nextafter(r, toward), r)

    def _stats(self, xb: torch.Tensor) -> torch.Tensor:
        if self.symmetric:
            return self._round_out(xb.abs().amax(dim=1), up=True)
        lo, hi = xb.amin(dim=1), xb.amax(dim=1)  # faster than aminmax on CPU
        return torch.stack([self._round_out(lo, up=False), self._round_out(hi, up=True)], dim=1)

    def _affine(self, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(offset, step) per block, float32, computed identically on both ends from stored stats."""
        s = stats.float()
        if self.symmetric:
            return torch.zeros_like(s), s / self.half
        return s[:, 0], (s[:, 1] - s[:, 0]) / self.levels

    # --- codes ----------------------------------------------------------------------------------
    def _pack_bits(self, q: torch.Tensor, nbytes: int) -> torch.Tensor:
        q = q.reshape(-1)
        if self.per_byte == 1:
            return q
        pad = nbytes * self.per_byte - q.numel()
        if pad:
            q = torch.cat([q, q.new_zeros(pad)])
        q = q.view(nbytes, self.per_byte)
        out = q[:, 0].clone()
        for j in range(1, self.per_byte):
            out |= q[:, j] << (self.bits * j)
        return out

    def _unpack_bits(self, codes: torch.Tensor, count: int) -> torch.Tensor:
        if self.per_byte == 1:
            return codes[:count]
        mask = self.levels
        out = torch.empty(codes.numel(), self.per_byte, dtype=torch.uint8, device=codes.device)
        for j in range(self.per_byte):
            out[:, j] = (codes >> (self.bits * j)) & mask
        return out.view(-1)[:count]

    # --- public ---------------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[stats, codes]`` for ``x`` (any shape); shape and dtype travel separately."""
        out = [torch.empty(s, dtype=d, device=x.device) for d, s in self.specs(tuple(x.shape))]
        self.quantize_into(x, *out)
        return out

    def quantize_into(self, x: torch.Tensor, stats: torch.Tensor, codes: torch.Tensor) -> None:
        """Write ``x``'s block stats and packed codes into ``stats`` and ``codes`` (shaped as :meth:`specs`
        says): a codec passes views of its payload, so nothing is copied into the payload afterwards."""
        if _util.numel(tuple(x.shape)) == 0:
            return
        if x.device.type == "cpu" and stats.is_contiguous() and codes.is_contiguous():  # views to write through
            quantize_cpu.quantize(self, x, _bytes(stats), codes.numpy())
        else:
            self.quantize_into_torch(x, stats, codes)

    def quantize_into_torch(self, x: torch.Tensor, stats: torch.Tensor, codes: torch.Tensor) -> None:
        """:meth:`quantize_into` in torch ops alone, for any device (CPU tensors take the faster, bit-identical
        lowbw.compress.quantize_cpu)."""
        n, b, nb, nbytes = self._geometry(tuple(x.shape))
        if n == 0:
            return
        xb = self._blocks(x)
        stats.copy_(self._stats(xb))
        off, step = self._affine(stats)
        inv = torch.where(step > 0, 1.0 / step, torch.zeros_like(step)).unsqueeze(1)
        # round half up = truncate(t + 1/2), t >= 0: t = (x - off) * inv, or x * inv + half (symmetric)
        t = xb.mul(inv) if self.symmetric else xb.sub(off.unsqueeze(1)).mul_(inv)
        shift, top = (self.half + 0.5, 2 * self.half) if self.symmetric else (0.5, self.levels)
        whole = codes if self.per_byte == 1 else torch.empty((nb, b), dtype=torch.uint8, device=x.device)
        if x.device.type == "cpu" and bool(torch.isfinite(inv).all()):
            # numpy adds and casts in one pass into the codes (torch's float -> uint8 copy is ~5x slower
            # here); t + shift lies in [1/2, top + 1) -- the stats cover the block -- so no clamp is needed
            # a non-finite input makes its block's scale 0 and t NaN: its code is the torch path's (tested), numpy's
            # warning about it only noise in a run whose activations blow up
            with np.errstate(invalid="ignore"):
                np.add(t.numpy(), np.float32(shift), out=whole.numpy().reshape(nb, b), casting="unsafe")
        else:
            whole.view(nb, b).copy_(t.add_(shift).clamp_(0, top))
        if self.per_byte > 1:
            codes.copy_(self._pack_bits(whole, nbytes))

    def dequantize(self, stats: torch.Tensor, codes: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """float32 tensor of ``shape`` from :meth:`quantize`'s output."""
        if codes.device.type == "cpu" and _util.numel(shape) > 0:
            return quantize_cpu.dequantize(self, _bytes(stats), stats.dtype, codes.numpy(), shape)
        return self.dequantize_torch(stats, codes, shape)

    def dequantize_torch(self, stats: torch.Tensor, codes: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """:meth:`dequantize` in torch ops alone, for any device."""
        n, b, nb, _ = self._geometry(shape)
        if n == 0:
            return torch.empty(shape, dtype=torch.float32, device=codes.device)
        q = self._unpack_bits(codes, nb * b).view(nb, b).float()
        off, step = self._affine(stats)
        if self.symmetric:
            q = q.sub_(self.half)
        y = q.mul_(step.unsqueeze(1)).add_(off.unsqueeze(1))
        return y.view(-1)[:n].view(shape)

    def entry_bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-block bound on |x̂ − x|, entries per block), float64."""
        n, b, nb, _ = self._geometry(tuple(x.shape))
        if n == 0:
            z = torch.zeros(0, dtype=torch.float64, device=x.device)
            return z, z
        stats = self._stats(self._blocks(x))
        _, step = self._affine(stats)
        amax = stats.double().abs().reshape(nb, -1).amax(dim=1)
        e = step.double() * (0.5 + 2.0**-12) + amax * 2.0**-21
        counts = torch.full((nb,), float(b), dtype=torch.float64, device=x.device)
        counts[-1] = n - (nb - 1) * b
        return e, counts

    def err_sq_bound(self, x: torch.Tensor) -> float:
        """Upper bound on ‖x̂ − x‖²."""
        e, counts = self.entry_bounds(x)
        return float((counts * e * e).sum())


class Quant(Codec):
    """Blockwise ``bits``-bit quantization, bit-packed; see the module docstring for bytes and bound."""

    name = "quant"
    _fixed_bits: ClassVar[int | None] = None

    def __init__(
        self,
        bits: int = 8,
        block: int = 64,
        symmetric: bool = False,
        scale_dtype: str = "bfloat16",
        **params: Any,
    ):
        super().__init__(**params)
        bits = _util.check_choice(self.name, "bits", bits, (2, 4, 8))
        block = _util.check_int(self.name, "block", block, 0, "entries per scale; 0 = one scale per row")
        symmetric = _util.check_bool(self.name, "symmetric", symmetric)
        sd = _util.check_dtype(self.name, "scale_dtype", scale_dtype)
        self.q = Quantizer(bits, block, symmetric, sd)
        self._plans: dict[tuple[tuple[int, ...], torch.dtype], tuple] = {}

    def encode(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        _util.check_float(self.name, x)
        shape = tuple(x.shape)
        if x.device.type == "cpu":  # numpy views of the payload: see lowbw.compress.quantize_cpu
            prefix, total, stats_at, codes_at = self._cpu_plan(shape, x.dtype)
            payload = torch.empty(total, dtype=torch.uint8)
            pn = payload.numpy()
            pn[: prefix.size] = prefix
            views = []
            for pos, nbytes, pad, _, _ in (stats_at, codes_at):
                views.append(pn[pos : pos + nbytes])
                if pad:
                    pn[pos + nbytes : pos + nbytes + pad] = 0
            if _util.numel(shape):
                quantize_cpu.quantize(self.q, x, *views)
            return payload
        payload, (meta, stats, codes) = pack_layout([_util.meta_spec(shape), *self.q.specs(shape)], x.device)
        _util.write_meta(meta, x)
        self.q.quantize_into(x, stats, codes)
        return payload

    def _cpu_plan(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[np.ndarray, int, tuple, tuple]:
        """(the payload's first bytes -- header and meta, fixed for a shape and dtype --, its length, and
        the ``(offset, nbytes, padding, dtype, shape)`` of stats and codes), kept per shape and dtype."""
        plan = self._plans.get((shape, dtype))
        if plan is None:
            if len(self._plans) >= 64:  # shapes keep changing: forget them rather than grow
                self._plans.clear()
            specs = [_util.meta_spec(shape), *self.q.specs(shape)]
            header, total, (meta_at, stats_at, codes_at) = layout(tuple((d, tuple(s)) for d, s in specs))
            meta = np.array([_DTYPE_CODE[dtype], *shape], dtype=np.int64).view(np.uint8)
            assert meta_at[0] == header.size and meta_at[1] == meta.size and meta_at[2] == 0
            plan = self._plans[shape, dtype] = (np.concatenate([header, meta]), total, stats_at, codes_at)
        return plan

    def decode(self, payload: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        if payload.device.type == "cpu":
            (_, _, m), (stats_dtype, _, stats), (_, _, codes) = unpack_numpy(payload)
            dtype, _, shape = _util.read_meta(m.view(np.int64))
            if _util.numel(shape):
                y = quantize_cpu.dequantize(self.q, stats, stats_dtype, codes, shape)
                return y if dtype == torch.float32 else y.to(dtype)
        m, stats, codes = unpack(payload)
        dtype, _, shape = _util.read_meta(m)
        return self.q.dequantize(stats, codes, shape).to(dtype)

    def payload_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Exact payload size for a tensor of ``shape`` (any float dtype: codes and scales do not depend on it)."""
        return packed_size([_util.meta_spec(shape), *self.q.specs(tuple(shape))])

    def error_bound(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> float:
        norm = float(x.detach().double().norm())
        if norm == 0.0:
            return 0.0
        return math.sqrt(self.q.err_sq_bound(x)) / norm


def _bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of a CPU tensor, as a flat uint8 numpy view (of a copy if ``t`` is not contiguous)."""
    return t.contiguous().view(torch.uint8).numpy().reshape(-1)


def _alias(bits: int) -> type[Quant]:
    class Alias(Quant):
        __doc__ = f"``quant`` with ``bits: {bits}`` (the other parameters as ``quant``)."
        name = f"int{bits}"

        def __init__(self, block: int = 64, symmetric: bool = False, scale_dtype: str = "bfloat16", **params: Any):
            if params:  # `bits` included: it is the alias's name
                Codec.__init__(self, **params)
            super().__init__(bits=bits, block=block, symmetric=symmetric, scale_dtype=scale_dtype)

    Alias.__name__ = Alias.__qualname__ = f"Int{bits}"
    return register_codec(Alias)


register_codec(Quant)
Int8 = _alias(8)
Int4 = _alias(4)
Int2 = _alias(2)

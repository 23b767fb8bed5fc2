"""``fp16`` and ``bf16``: cast to a 16-bit float on the wire, back to the input's dtype on decode.

Bytes: ``2·numel`` plus the header (payload layout + an int64 ``[dtype, *shape]`` tensor).
Error: round-to-nearest, so each entry is off by at most ``u·|x|`` with unit roundoff
``u = 2⁻¹¹`` (fp16) or ``2⁻⁸`` (bf16), plus half the subnormal spacing (``2⁻²⁵`` for fp16) for tiny
entries; ‖x̂ − x‖/‖x‖ ≤ u when nothing is subnormal. fp16 overflows beyond ±65504 (bound: inf) and
flushes values under ~6e-8 to zero -- tiny activation gradients are safer in bf16.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from lowbw.compress import _util
from lowbw.compress.base import Codec, register_codec
from lowbw.compress.payload import pack, packed_size, unpack


class _Cast(Codec):
    wire: ClassVar[torch.dtype]
    unit_roundoff: ClassVar[float]
    half_subnormal: ClassVar[float]
    max_finite: ClassVar[float]

    def __init__(self, **params: Any):
        super().__init__(**params)

    def encode(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        _util.check_float(self.name, x)
        return pack([_util.meta(x)[:1], x.detach().to(self.wire)])

    def decode(self, payload: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        m, y = unpack(payload)
        dtype, _, _ = _util.read_meta(m)
        return y.to(dtype)

    def payload_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return packed_size([(torch.int64, (1,)), (self.wire, tuple(shape))])

    def error_bound(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> float:
        if x.dtype == self.wire:
            return 0.0
        a = x.detach().double().abs()
        if a.numel() == 0 or float(a.max()) == 0.0:
            return 0.0
        if float(a.max()) > self.max_finite:
            return math.inf
        per_entry = torch.clamp(a * self.unit_roundoff, min=self.half_subnormal)
        return float(per_entry.norm() / a.norm())


@register_codec
class Fp16(_Cast):
    """IEEE half precision on the wire (ratio ~2 for float32 input)."""

    name = "fp16"
    wire = torch.float16
    unit_roundoff = 2.0**-11
    half_subnormal = 2.0**-25
    max_finite = 65504.0


@register_codec
class Bf16(_Cast):
    """bfloat16 on the wire: float32's range, 8 bits of precision (ratio ~2 for float32 input)."""

    name = "bf16"
    wire = torch.bfloat16
    unit_roundoff = 2.0**-8
    half_subnormal = 2.0**-134
    max_finite = float(torch.finfo(torch.bfloat16).max)

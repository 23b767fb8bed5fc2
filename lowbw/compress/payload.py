"""Pack a few tensors into one flat uint8 payload and back.

Layout: ``u32 count`` then per tensor ``u8 dtype, u8 ndim, i64 shape[ndim]``, padded to 8 bytes;
then each tensor's bytes, each padded to 8 bytes so the receiver can view them without copying.
Every byte here -- header and padding too -- is charged on the link.
"""

from __future__ import annotations

import functools
import struct
from typing import Union

import numpy as np
import torch

_DTYPES = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
]
_CODE = {dt: i for i, dt in enumerate(_DTYPES)}
_ALIGN = 8


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors (any device) into one uint8 tensor on the device of the first."""
    device = tensors[0].device if tensors else torch.device("cpu")
    payload, views = pack_layout([(t.dtype, tuple(t.shape)) for t in tensors], device)
    for t, v in zip(tensors, views):
        v.copy_(t.detach())
    return payload


def pack_parts(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """:func:`pack`'s payload as pieces whose concatenation it is: the header, each tensor's own bytes (a
    view of the tensor, not a copy) and its padding. For a wire that copies a message into place anyway
    (lowbw.net.wire.Wire.isend_parts): the payload is then copied once, not twice. Tensors on the CPU."""
    specs = tuple((t.dtype, tuple(t.shape)) for t in tensors)
    parts = [_header_tensor(specs)]
    places = layout(specs)[2]
    for t, (_, _, pad, _, _) in zip(tensors, places):
        parts.append(t.detach().reshape(-1).view(torch.uint8))
        if pad:
            parts.append(_ZEROS[:pad])
    return tuple(parts)


_ZEROS = torch.zeros(_ALIGN, dtype=torch.uint8)

#: A piece of a payload: a 1-D uint8 tensor, or on the CPU a bytes-like object of unsigned bytes (bytes, a 1-D
#: uint8 numpy array) -- what a wire that copies into shared memory takes without a torch call.
Part = Union[torch.Tensor, bytes, np.ndarray]


def part_nbytes(p: Part) -> int:
    return p.numel() if isinstance(p, torch.Tensor) else len(p)


def part_tensor(p: Part) -> torch.Tensor:
    """A piece as a 1-D uint8 tensor (a copy when it is not a tensor already)."""
    return p if isinstance(p, torch.Tensor) else torch.from_numpy(np.frombuffer(p, dtype=np.uint8).copy())


def pack_parts_cpu(x: torch.Tensor) -> tuple[Part, ...]:
    """:func:`pack_parts` of one CPU tensor as bytes-like pieces: the header and padding as bytes (worked out once
    per dtype and shape), the tensor's own bytes as a numpy view. Two torch calls where :func:`pack_parts` makes
    five, each a few us, tens with the caches cold after a stage's compute, when a sender encodes."""
    framing = _FRAMING.get((x.dtype, x.shape))
    if framing is None:
        header, _, places = layout(((x.dtype, tuple(x.shape)),))
        framing = _FRAMING[(x.dtype, x.shape)] = (header.tobytes(), (bytes(places[0][2]),) if places[0][2] else ())
    head, pad = framing
    try:  # a sender's tensor is detached already: one torch call fewer than detaching it again
        data = x.numpy()
    except RuntimeError:  # it requires grad
        data = x.detach().numpy()
    return (head, data.reshape(-1).view(np.uint8)) + pad


_FRAMING: dict[tuple, tuple[bytes, tuple[bytes, ...]]] = {}


@functools.lru_cache(maxsize=1024)
def _header_tensor(specs: tuple[tuple[torch.dtype, tuple[int, ...]], ...]) -> torch.Tensor:
    """The header bytes of :func:`layout`'s ``specs`` as a tensor of their own (read, never written)."""
    return torch.from_numpy(layout(specs)[0].copy())


def pack_layout(specs: list[tuple[torch.dtype, tuple[int, ...]]],
                device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A payload for tensors of these ``(dtype, shape)``, header and padding written, and a view of each
    tensor's place in it: a codec fills the views where they lie, with no copy into a payload afterwards."""
    header, total, places = layout(tuple((dtype, tuple(int(d) for d in shape)) for dtype, shape in specs))
    payload = torch.empty(total, dtype=torch.uint8, device=device)
    if payload.device.type == "cpu":  # a numpy copy of a few dozen bytes costs a tenth of torch's
        payload.numpy()[: header.size] = header
    else:
        payload[: header.size].copy_(torch.from_numpy(header))
    views = []
    for pos, nbytes, pad, dtype, shape in places:
        views.append(payload[pos : pos + nbytes].view(dtype).view(shape))
        if pad:
            payload[pos + nbytes : pos + nbytes + pad] = 0
    return payload, views


@functools.lru_cache(maxsize=1024)
def layout(specs: tuple[tuple[torch.dtype, tuple[int, ...]], ...]) -> tuple[np.ndarray, int, tuple]:
    """(header bytes as a uint8 array -- read, never written --, payload length, per tensor its
    ``(offset, nbytes, padding, dtype, shape)``) of :func:`pack_layout`'s payload for ``specs`` (a tuple
    of ``(dtype, tuple shape)``), computed once per layout: a codec sends tensors of the same few
    shapes message after message. A codec's CPU path may fill such a payload through numpy itself."""
    header = bytearray(struct.pack("<I", len(specs)))
    for dtype, shape in specs:
        if dtype not in _CODE:
            raise TypeError(f"cannot pack dtype {dtype}")
        header += struct.pack("<BB", _CODE[dtype], len(shape))
        header += struct.pack(f"<{len(shape)}q", *shape)
    header += b"\0" * _pad(len(header))
    places, pos = [], len(header)
    for dtype, shape in specs:
        nbytes = _ITEMSIZE[dtype] * _numel(shape)
        places.append((pos, nbytes, _pad(nbytes), dtype, shape))
        pos += nbytes + _pad(nbytes)
    return np.frombuffer(header, dtype=np.uint8), pos, tuple(places)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def unpack(payload: torch.Tensor) -> list[torch.Tensor]:
    """Invert :func:`pack`; the tensors are views into ``payload`` (on its device).

    A CPU payload is read through numpy: one torch call a tensor instead of five for the header and
    three a tensor (a few us each, more with the caches cold after a stage's compute; every received
    message is unpacked on the receiver's critical path)."""
    if payload.is_cpu:
        pn = payload.numpy()
        return [torch.from_numpy(pn[pos : pos + nbytes].view(_NUMPY[dtype]).reshape(shape)) if dtype in _NUMPY
                else payload[pos : pos + nbytes].view(dtype).reshape(shape)
                for pos, nbytes, dtype, shape in _parse(pn, pn.size)]
    head = payload[: min(payload.numel(), 4096)].cpu().numpy().tobytes()
    return [payload[pos : pos + nbytes].view(dtype).reshape(shape)
            for pos, nbytes, dtype, shape in _parse(head, payload.numel())]


def unpack_numpy(payload: torch.Tensor) -> list[tuple[torch.dtype, tuple[int, ...], np.ndarray]]:
    """:func:`unpack` for a CPU payload, as ``(dtype, shape, its bytes)``: each tensor's place in the
    payload as a uint8 numpy view, to be reinterpreted by the caller. No torch call but one, which
    is what a codec's CPU path wants: a torch view costs a few µs a call, ~20 µs with cold caches (a
    codec runs between a model's layers), a numpy slice a fraction of that."""
    pn = payload.numpy()
    return [(dtype, shape, pn[pos : pos + nbytes])
            for pos, nbytes, dtype, shape in _parse(pn, pn.size)]


def _parse(head, size: int) -> list[tuple[int, int, torch.dtype, tuple[int, ...]]]:
    """``(offset, nbytes, dtype, shape)`` of each tensor of a payload of ``size`` bytes starting with ``head``
    (bytes, or any buffer: the payload's own bytes)."""
    (count,) = struct.unpack_from("<I", head, 0)
    pos = 4
    specs = []
    for _ in range(count):
        code, ndim = struct.unpack_from("<BB", head, pos)
        pos += 2
        shape = struct.unpack_from(f"<{ndim}q", head, pos)
        pos += 8 * ndim
        specs.append((_DTYPES[code], shape))
    pos += _pad(pos)
    out = []
    for dtype, shape in specs:
        nbytes = _numel(shape) * _ITEMSIZE[dtype]
        out.append((pos, nbytes, dtype, shape))
        pos += nbytes + _pad(nbytes)
    if pos != size:
        raise ValueError(f"payload has {size} bytes, its header describes {pos}")
    return out


def packed_size(specs: list[tuple[torch.dtype, tuple[int, ...]]]) -> int:
    """Bytes :func:`pack` produces for tensors of these ``(dtype, shape)`` -- computed, nothing allocated.

    Codecs use it for :meth:`~lowbw.compress.base.Codec.estimate_ratio` on shapes too large to
    encode, and the tests use it to prove a payload holds exactly what its formula says.
    """
    header = 4
    for _, shape in specs:
        header += 2 + 8 * len(shape)
    total = header + _pad(header)
    for dtype, shape in specs:
        numel = 1
        for d in shape:
            numel *= int(d)
        nbytes = numel * _ITEMSIZE[dtype]
        total += nbytes + _pad(nbytes)
    return total


_ITEMSIZE = {dt: torch.empty((), dtype=dt).element_size() for dt in _DTYPES}
#: numpy's twin of each dtype that has one (bfloat16 has none)
_NUMPY = {dt: torch.empty((), dtype=dt).numpy().dtype for dt in _DTYPES if dt != torch.bfloat16}

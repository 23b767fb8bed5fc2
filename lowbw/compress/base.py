"""Codec base class and registry: what crosses a stage boundary.

A codec turns a tensor into a payload -- one flat ``uint8`` tensor whose length is exactly the
number of bytes charged on the link, metadata included -- and back. Forward activations and backward
activation-gradients each get their own codec instance per stage boundary, on both ends: the
sender's instance encodes, the receiver's decodes. Stateful codecs (error feedback, warm starts,
per-sample caches) keep their state in those instances, so state is naturally per boundary and
per direction.

Adding a codec: subclass :class:`Codec`, give it a ``name``, decorate it with
:func:`register_codec`; ``compress/fwd=<name>`` then selects it.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from lowbw.compress.payload import Part, layout, pack, pack_parts, pack_parts_cpu, packed_size, unpack
from lowbw.errors import ConfigError


class Codec(ABC):
    """Encode a tensor into bytes on the wire, decode it back.

    ``sample_ids`` (the dataset indices of the microbatch's rows, shape ``[batch]``) is passed to
    both sides so that per-sample codecs (activation deltas) can key their caches.
    """

    name: ClassVar[str] = ""
    #: True when encode/decode depend on earlier messages (residuals, caches, warm starts).
    stateful: ClassVar[bool] = False
    #: Directions the codec makes sense for: "fwd" (activations), "bwd" (activation gradients).
    directions: ClassVar[tuple[str, ...]] = ("fwd", "bwd")

    def __init__(self, **params: Any):
        if params:
            known = [
                p for p in inspect.signature(type(self).__init__).parameters
                if p not in ("self", "params")
            ]
            raise ConfigError(
                f"codec {self.name!r} has no parameter {', '.join(map(repr, sorted(params)))}; "
                f"remove it or use one of: {', '.join(known) if known else '(none)'}"
            )

    @abstractmethod
    def encode(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Return the payload: a 1-D contiguous uint8 tensor holding everything decode needs."""

    @abstractmethod
    def decode(self, payload: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Invert :meth:`encode` (exactly for lossless codecs)."""

    def encode_parts(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> tuple[Part, ...]:
        """:meth:`encode`'s payload as pieces whose concatenation it is: 1-D uint8 tensors, or on the CPU
        bytes-like objects (lowbw.compress.payload.Part); the executor sends these (the wire copies them into
        its message). The default is the payload whole; a codec whose payload holds the input's own bytes
        returns views of them instead of copying them into a payload first."""
        return (self.encode(x, sample_ids),)

    def decoded_view(self, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """For a codec whose :meth:`decode` is a view of the payload: that view, made before the payload's bytes
        are in (``payload``: the receive buffer posted for a tensor of this shape and dtype); it holds the decoded
        tensor once they are. None (the default): decode when the message is taken. The receiver makes it when it
        posts the receive, at a step's start, instead of with the caches cold right before the compute that
        waits for it (lowbw.pipeline.executor); the sender has checked its tensor against the same spec."""
        return None

    def payload_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int | None:
        """Exact length of :meth:`encode`'s payload for a tensor of this shape and dtype, nothing encoded.

        None when the length depends on the data or on the codec's state (``aqsgd``: which samples its
        cache holds). The transport posts a receive of exactly this many bytes before the message
        exists (lowbw.net.transport); for None it sends a small fixed-size header first. The built-in
        codecs each give the formula of their docstring; the tests check it against ``encode``.
        """
        return None

    def estimate_ratio(self, shape: tuple[int, ...], dtype: torch.dtype) -> float:
        """Raw bytes / payload bytes for a tensor of this shape, without encoding one (for the simulator)."""
        raw = math.prod(int(d) for d in shape) * torch.empty((), dtype=dtype).element_size()
        nbytes = self.payload_nbytes(tuple(shape), dtype)
        if nbytes is None:  # a codec without a formula: encode zeros once
            nbytes = self.encode(torch.zeros(shape, dtype=dtype)).numel()
        return raw / nbytes

    def error_bound(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> float:
        """Guaranteed upper bound on ``‖x̂ − x‖ / ‖x‖`` if ``x`` were encoded now (``math.inf``: none known).

        ``x̂`` is what the receiver's :meth:`decode` returns. The bound depends on ``x`` and, for
        stateful codecs, on the current state (carried residual, cache); it does not change the state.
        Each codec documents its formula (``docs/compression.md``); the tests check it holds.
        """
        return math.inf

    def reconstruction(self, payload: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Sender side: the ``x̂`` the receiver's :meth:`decode` returns for ``payload``, state untouched.

        For measuring ``‖x̂ − x‖ / ‖x‖`` where ``x`` lives (the sender). The default decodes, which is
        right for every codec whose receiver keeps no state; codecs with receiver-side state override it.
        """
        return self.decode(payload, sample_ids)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"codec {self.name!r} keeps no state, got keys {sorted(state)}")

    def reset(self) -> None:
        """Forget all state (between runs)."""


CODECS: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty `name` to be registered")
    if cls.name in CODECS and CODECS[cls.name] is not cls:
        raise TypeError(f"codec name {cls.name!r} is taken by {CODECS[cls.name].__name__}")
    CODECS[cls.name] = cls
    return cls


def build_codec(spec: dict[str, Any] | str) -> Codec:
    """Build a codec from its config node (``{"name": ..., **params}``) or a bare name.

    The built-in codecs are registered: importing this module imports the ``lowbw.compress`` package
    first, whose ``__init__`` imports every codec module."""
    params = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = params.pop("name", None)
    if name not in CODECS:
        raise ConfigError(f"unknown codec {name!r}; known codecs: {', '.join(sorted(CODECS))}")
    params = {k: v for k, v in params.items() if not k.startswith("_")}
    return CODECS[name](**params)


@register_codec
class NoCodec(Codec):
    """The tensor's own bytes, sent as they are (lossless, ratio 1)."""

    name = "none"

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._shape: tuple[int, ...] | None = None
        self._dtype: torch.dtype | None = None

    def encode(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        return pack([x])

    def encode_parts(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> tuple[Part, ...]:
        # The header and a view of x: the wire's copy is the only one. Measured in scripts/bench_overhead.py's
        # interleaved 1F1B run: encode took 2.4 ms a step a rank with a copy per message (12), 0.9 ms with views.
        if not x.is_cpu:
            return (self.encode(x),)
        return pack_parts([x]) if x.dtype == torch.bfloat16 else pack_parts_cpu(x)  # numpy has no bfloat16

    def decode(self, payload: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        (x,) = unpack(payload)
        return x

    def decoded_view(self, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        pos, nbytes, _, _, _ = layout(((dtype, tuple(shape)),))[2][0]
        return payload[pos:pos + nbytes].view(dtype).view(shape)

    def payload_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return packed_size([(dtype, tuple(shape))])

    def estimate_ratio(self, shape: tuple[int, ...], dtype: torch.dtype) -> float:
        return 1.0

    def error_bound(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> float:
        return 0.0

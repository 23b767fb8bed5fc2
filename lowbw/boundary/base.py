"""Boundary methods: what the model sends across a stage boundary, by construction.

A codec (lowbw.compress) compresses whatever tensor crosses; a boundary method changes the model so
that what crosses is small to begin with. ``boundary=<name>`` picks one; codecs still apply on top
(e.g. subspace coordinates sent as int8). A method builds the modules a stage holds -- so their
parameters are the stage's, seen by the optimizer, checkpoints, gradient checks and FLOP counting:

==================  ==============================================================================
``embedding()``     the first stage's token embedding (ids -> stream); None: the dense one
``adapt_block(b)``  a block as this method runs it (subspace: output projections into span(U))
``sender(i)``       on the stage before boundary i: stream -> what crosses; None: the stream itself
``receiver(i)``     on the stage after boundary i: what crossed (+ token ids) -> stream
``residual(x)``     the residual stream of a stream (for the last stage's head)
==================  ==============================================================================

Boundary i sits between model stages i and i+1. Each method also states, in closed form, its
bytes per token on the wire (:meth:`wire_bytes_per_token`), its parameters beside the dense model's
(:meth:`param_delta`) and its FLOPs (:meth:`flop_terms`), which the simulator uses and the tests
check against the real payloads, ``named_parameters`` and ``torch.utils.flop_counter``.

Adding a method: subclass :class:`BoundaryMethod`, give it a ``name``, decorate with
:func:`register_method`, import it in ``lowbw/boundary/__init__.py``; ``configs/boundary/<name>.yaml``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
import torch.nn as nn

from lowbw.errors import ConfigError

#: bytes of one token id on the wire: int16 holds any id of a vocabulary of up to 32,768 (lowbw's: 256 bytes).
TOKEN_ID_BYTES = 2


def seeded(seed: int, tag: int) -> torch.Generator:
    """A generator for a method's fixed tensors, apart from the weights' streams (lowbw.models.gpt._seeded)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 500_009 + tag)


def orthonormal(d: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """A d x k matrix with orthonormal columns: QR of a Gaussian matrix (Haar-distributed up to signs)."""
    q, r = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(torch.float32)


class BoundaryMethod:
    """The dense model: the residual stream crosses as it is (``boundary=none``)."""

    name: ClassVar[str] = "none"
    #: True when a receiver needs the token ids: they travel in the forward payload (TOKEN_ID_BYTES each).
    sends_tokens: ClassVar[bool] = False

    def __init__(self, model: Any, spec: Any, seed: int):
        self.model, self.spec, self.seed = model, spec, seed
        self.d = model.n_embd

    def check(self) -> None:
        """ConfigError naming the setting when the spec does not fit the model."""

    # ---- the model -------------------------------------------------------------------------------
    def embedding(self) -> Optional[nn.Module]:
        return None

    def adapt_block(self, block: nn.Module) -> nn.Module:
        return block

    def sender(self, boundary: int) -> Optional[nn.Module]:
        return None

    def receiver(self, boundary: int) -> Optional[nn.Module]:
        return None

    def residual(self, stream: Any) -> torch.Tensor:
        return stream

    def describe(self) -> str:
        """The method and its size, in words (the console and the simulator's summary)."""
        return "none (the residual stream crosses as it is)"

    # ---- closed forms ----------------------------------------------------------------------------
    def wire_width(self) -> int:
        """Values per token that cross a boundary (each way) before any codec."""
        return self.d

    def wire_bytes_per_token(self, itemsize: int) -> tuple[int, int]:
        """(forward, backward) bytes per token on the wire with no codec, payload headers left out."""
        fwd = self.wire_width() * itemsize + (TOKEN_ID_BYTES if self.sends_tokens else 0)
        return fwd, self.wire_width() * itemsize

    def param_delta(self, n_stages: int) -> int:
        """Parameters of the whole model minus the dense model's (lowbw.models.flops.n_params)."""
        return 0

    def flop_terms(self, microbatch: int) -> dict[str, tuple[float, float]]:
        """(forward, backward) FLOPs of one microbatch added to the dense model's, as flop_counter counts
        them: ``block`` per block, ``embed`` on the first stage, ``send`` / ``recv`` per boundary side."""
        return {}


METHODS: dict[str, type[BoundaryMethod]] = {}


def register_method(cls: type[BoundaryMethod]) -> type[BoundaryMethod]:
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise TypeError(f"boundary method name {cls.name!r} is taken by {METHODS[cls.name].__name__}")
    METHODS[cls.name] = cls
    return cls


register_method(BoundaryMethod)


def build_method(spec: Any, model: Any, seed: int) -> BoundaryMethod:
    """The method ``spec.name`` names (``spec``: a BoundaryConfig or its node; None = ``none``), checked."""
    name = "none" if spec is None else spec.name
    if name not in METHODS:
        raise ConfigError(f"boundary={name!r} is not a boundary method; use one of {', '.join(sorted(METHODS))}")
    method = METHODS[name](model, spec, seed)
    method.check()
    return method

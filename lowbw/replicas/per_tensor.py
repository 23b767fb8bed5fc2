"""A codec for a replica group's flat vector: the parameters' own tensors, each through its own codec.

The replica axis sends what the optimizer works on -- weight gradients, pseudo-gradients --, a
concatenation of tensors of different shapes. A codec sees each tensor in its own shape (PowerSGD
needs a weight matrix as a matrix, Vogels et al. 2019; a vector such as a norm's gain or a bias
goes through the codec as it is), with an instance per tensor so that warm starts and residuals
stay per parameter. One payload holds the parts back to back; every part's length comes from the
codec's ``payload_nbytes``, so the whole length is known before anything is encoded.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019, "Error feedback fixes SignSGD"): what a
lossy codec did not send is added to the next vector, so nothing is lost, only delayed -- what
compressed data parallelism needs to converge like the uncompressed one (PowerSGD's own data-parallel
algorithm keeps such a residual). Codecs that carry a residual of their own (``topk``, ``randk`` with
``error_feedback: true``) keep it; for every other lossy codec this wrapper carries it.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from lowbw.compress.base import Codec, build_codec


class PerTensor:
    """Encode a flat float32 vector laid out as ``shapes`` (in order); decode it back."""

    def __init__(self, spec: Any, shapes: list[tuple[int, ...]]):
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.codecs: list[Codec] = [build_codec(spec) for _ in self.shapes]
        self.name = self.codecs[0].name if self.codecs else build_codec(spec).name
        self.lossless = self.name == "none"
        own = getattr(self.codecs[0], "error_feedback", False) if self.codecs else False
        self.feedback = not self.lossless and not own  # carried here (see the module's docstring)
        self.residual: Optional[torch.Tensor] = None
        self.part_nbytes = [c.payload_nbytes(s, torch.float32) for c, s in zip(self.codecs, self.shapes)]

    @property
    def nbytes(self) -> int:
        return sum(self.part_nbytes)

    def encode(self, flat: torch.Tensor) -> torch.Tensor:
        x = flat if self.residual is None else flat + self.residual
        parts = [c.encode(t.view(s)) for c, t, s in zip(self.codecs, x.split(self.sizes), self.shapes)]
        payload = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
        if self.feedback:  # what the receivers will decode, from the sender's own copy of the payload
            self.residual = x - self._reconstruct(payload)
        return payload

    def _reconstruct(self, payload: torch.Tensor) -> torch.Tensor:
        parts = payload.split(self.part_nbytes)
        return torch.cat([c.reconstruction(p).reshape(-1).float() for c, p in zip(self.codecs, parts)])

    def decode(self, payload: torch.Tensor) -> torch.Tensor:
        parts = payload.split(self.part_nbytes)
        return torch.cat([c.decode(p).reshape(-1).float() for c, p in zip(self.codecs, parts)])

    def state_dict(self) -> dict:
        return {"codecs": [c.state_dict() for c in self.codecs], "residual": self.residual}

    def load_state_dict(self, state: dict) -> None:
        for c, s in zip(self.codecs, state["codecs"]):
            c.load_state_dict(s)
        self.residual = state["residual"]

"""A stage as a rank holds it: its module and the codecs at its two boundaries.

Each stage boundary has a codec for forward activations and one for backward activation-gradients,
and each end of a boundary keeps its own instance (stateful codecs -- error feedback, warm starts,
per-sample caches -- keep their state per boundary, direction and end). The roles, in one place:

==================  ==========================================================================
``send_fwd``        encodes this stage's outputs for stage index+1
``recv_fwd``        decodes this stage's inputs from stage index-1
``send_bwd``        encodes gradients of this stage's inputs for stage index-1
``recv_bwd``        decodes gradients of this stage's outputs from stage index+1
``eval_send_fwd``   evaluation's own forward codecs, so that validation batches leave no trace in
``eval_recv_fwd``   training state (residuals, caches, warm starts)
==================  ==========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from lowbw.compress.base import Codec, build_codec
from lowbw.compress.payload import pack, unpack
from lowbw.pipeline.actions import Kind

ROLES = ("send_fwd", "recv_fwd", "send_bwd", "recv_bwd", "eval_send_fwd", "eval_recv_fwd")


@dataclass
class BoundaryCodecs:
    """The six codec instances of one stage (see the module docstring); None where no codec is needed."""

    send_fwd: Optional[Codec] = None
    recv_fwd: Optional[Codec] = None
    send_bwd: Optional[Codec] = None
    recv_bwd: Optional[Codec] = None
    eval_send_fwd: Optional[Codec] = None
    eval_recv_fwd: Optional[Codec] = None

    @classmethod
    def build(cls, fwd: dict[str, Any] | str, bwd: dict[str, Any] | str) -> "BoundaryCodecs":
        """One fresh instance per role from the (validated) codec specs of each direction."""
        spec = {"fwd": fwd, "bwd": bwd}
        return cls(**{role: build_codec(spec[role[-3:]]) for role in ROLES})

    def for_action(self, kind: Kind, train: bool) -> Codec:
        """The codec a SEND_* / RECV_* action of the given phase uses."""
        if kind == Kind.SEND_F:
            return self.send_fwd if train else self.eval_send_fwd
        if kind == Kind.RECV_F:
            return self.recv_fwd if train else self.eval_recv_fwd
        return self.send_bwd if kind == Kind.SEND_B else self.recv_bwd

    def state_dict(self) -> dict[str, dict]:
        return {role: getattr(self, role).state_dict() for role in ROLES if getattr(self, role) is not None}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for role in ROLES:
            codec = getattr(self, role)
            if codec is not None:
                codec.load_state_dict(state[role])


@dataclass
class StageRuntime:
    """A stage held by this rank: its module and its boundary codecs.

    ``sends_tokens``: the model's boundary method (lowbw.boundary) needs the token ids beside what
    crosses forward (subspace networks rebuild the residual stream from them); they travel inside
    the forward payload (:func:`attach_tokens`), so the link charges them.
    """

    index: int
    module: torch.nn.Module
    codecs: BoundaryCodecs = field(default_factory=BoundaryCodecs)
    sends_tokens: bool = False

    def boundary(self, tokens: tuple[int, ...]) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of what crosses either boundary of this stage, either way, for a microbatch of
        token ids of shape ``tokens``: receivers size their buffers from it before the message exists."""
        return self.module.hidden_spec(tuple(tokens))

    def sized(self, kind: Any) -> bool:
        """Whether messages of this action kind (a send or a receive) have a length known in advance: not a
        forward message of a boundary method that carries token ids (header-first instead)."""
        return not (self.sends_tokens and kind.name.endswith("_F"))


def attach_tokens(payload: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """One payload holding a codec's payload and the token ids as int16 (2 bytes each; vocabularies of up
    to 32,768 ids -- lowbw's is 256): 32 header bytes (for [microbatch, T] ids) + the codec's payload
    and 2 bytes a token, each padded to 8 (lowbw.compress.payload)."""
    return pack([payload, tokens.to(torch.int16)])


def split_tokens(payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert :func:`attach_tokens`: (the codec's payload, token ids as int64)."""
    inner, tokens = unpack(payload)
    return inner, tokens.long()

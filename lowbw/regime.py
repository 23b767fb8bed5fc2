"""A deployment's regime on a laptop: a small model learns while the run's clock keeps a target's timing.

``regime=gpt_1b hardware=rtx4090 net=home pipeline.stages=8`` trains the run's own model (e.g. the
tiny GPT) in 8 processes, and its virtual clock charges what a 1B GPT would cost on 8 RTX 4090s over
home broadband:

- **compute**: each forward and backward of stage ``s`` costs the target model's FLOPs for stage ``s``
  (:func:`lowbw.models.flops.stage_flops`, the closed form lowbw-simulate uses; the target is cut as
  evenly as its blocks allow -- finer than whole blocks when there are more stages than blocks -- whatever
  ``pipeline.partition`` does to the small model) divided by the rank's hardware profile's effective rate;
- **messages**: a message of ``n`` bytes is charged ``n x target_bytes / run_bytes`` (rounded), where
  those are the payload the same codec produces for the target's activation shape and dtype
  (``regime.activation_dtype``, bf16 by default, as a GPU pipeline sends; counted as lowbw-simulate counts
  it) and for the run's (float32, one message encoded): the target's message after the same codec. For a
  codec whose payload depends only on the shape this is exactly what lowbw-simulate charges, so the run's
  step time equals the simulator's for the target (tests/test_regime.py); a codec whose payload varies
  (delta's first sight of a sample) is scaled in proportion. A codec's *ratio* is not carried over as such: int8 shrinks float32 3.9x and
  bf16 1.9x; what carries over is its bytes per element.

Tokens per step are the target's (``train.batch_size`` sequences of the target's context), and energy is
the target's: the run's ``hardware`` profile busy for the target's compute, the network priced on the
target's bytes. The loss is the small model's, measured. Time to a target loss is then the small model's
steps to it times the target's step time -- valid as far as the small model's loss per step stands in for
the large one's (docs/time_to_loss.md says where it does not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from lowbw.compress import build_codec
from lowbw.config import plain
from lowbw.errors import ConfigError
from lowbw.models.flops import stage_flops

#: lowbw-train's activations and gradients are float32 (the model is built in float32, no autocast)
RUN_DTYPE = torch.float32


@dataclass(frozen=True)
class Regime:
    """What the run's clock charges instead of the run's own model (built once, in validation)."""

    name: str  # label (regime.name)
    model: dict  # the target model's fields (regime.model)
    activation_dtype: str  # the target's activations and gradients before the codec
    stage_flops: tuple[tuple[float, float], ...]  # (forward, backward) FLOPs of one target microbatch per stage
    fractional_partition: bool  # the target is cut finer than whole blocks (more stages than blocks)
    message_bytes: dict[str, tuple[int, int]]  # "fwd" / "bwd" -> (target payload, run payload) of one message
    tokens_per_step: int  # target tokens per optimizer step: train.batch_size x the target's context
    learning_tokens_per_step: int  # the run's own tokens per step

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "activation_dtype": self.activation_dtype,
                "stage_flops": [list(f) for f in self.stage_flops], "fractional_partition": self.fractional_partition,
                "message_bytes": {d: {"target": t, "run": r} for d, (t, r) in self.message_bytes.items()},
                "tokens_per_step": self.tokens_per_step, "learning_tokens_per_step": self.learning_tokens_per_step}


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ConfigError(f"regime.activation_dtype={name!r} is not a floating-point torch dtype (e.g. bfloat16)")
    return dt


def _message_bytes(spec: Any, direction: str, target: tuple[int, ...], dtype: torch.dtype,
                   run: tuple[int, ...]) -> tuple[int, int]:
    """(target, run) bytes the codec of ``direction`` puts on the wire for one activation message: the target's
    as lowbw-simulate charges it (raw bytes / the codec's ``estimate_ratio``), the run's by encoding one."""
    try:
        codec = build_codec(plain(spec))
        raw = math.prod(target) * torch.empty((), dtype=dtype).element_size()
        target_bytes = int(round(raw / float(codec.estimate_ratio(target, dtype))))
        run_bytes = int(build_codec(plain(spec)).encode(torch.zeros(run, dtype=RUN_DTYPE)).numel())
    except ConfigError as e:
        raise ConfigError(f"compress.{direction}: {e}") from None
    return target_bytes, run_bytes


def _check_target(m: Any) -> None:
    for name in ("n_layer", "n_embd", "n_head", "block_size", "vocab_size"):
        v = getattr(m, name, None)
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"regime.model.{name}={v} must be a positive integer")
    if m.n_embd % m.n_head:
        raise ConfigError(f"regime.model.n_head={m.n_head} must divide regime.model.n_embd={m.n_embd}")


def build_regime(cfg: Any, n_stages: int) -> Optional[Regime]:
    """The regime of a validated run config with ``n_stages`` model stages; None when ``regime=none``."""
    r = cfg.regime
    if r.model is None:
        if r.name != "none":
            raise ConfigError(f"regime.name={r.name!r} but regime.model is null; use regime=none or give a target "
                              "model (e.g. regime=gpt_1b)")
        return None
    if r.name == "none":
        raise ConfigError("regime.model is set but regime.name=none; name the regime (e.g. regime.name=gpt_1b)")
    if cfg.clock.name != "virtual" or cfg.clock.durations != "flops":
        raise ConfigError(f"regime={r.name} times the target on the virtual clock from its FLOPs; use clock=virtual "
                          f"clock.durations=flops (got clock={cfg.clock.name}, clock.durations={cfg.clock.durations})")
    target = r.model
    _check_target(target)
    dtype = _dtype(r.activation_dtype)
    mb = cfg.train.batch_size // cfg.pipeline.microbatches
    flops, fractional = stage_flops(target, n_stages, mb, None)
    small = (mb, cfg.model.block_size, cfg.model.n_embd)
    big = (mb, target.block_size, target.n_embd)
    message = {d: _message_bytes(cfg.compress[d], d, big, dtype, small) for d in ("fwd", "bwd")}
    return Regime(str(r.name), plain(target), str(r.activation_dtype), tuple(tuple(f) for f in flops), fractional,
                  message, cfg.train.batch_size * target.block_size, cfg.train.batch_size * cfg.model.block_size)

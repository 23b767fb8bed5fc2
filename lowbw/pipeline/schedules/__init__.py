"""Schedules: generators registered by name, lowered and validated by :func:`build_schedule`.

Each generator module registers itself (importing this package registers the built-in ones):
``classic`` (gpipe, 1f1b), ``interleaved`` (interleaved_1f1b), ``zero_bubble`` (zb_h1),
``pipedream_2bw`` (asynchronous), ``v_shape`` (zbv, dualpipev). ``schedule=csv`` reads a per-rank action CSV
instead. :func:`build_schedule` validates the result by compiling it (lowbw.pipeline.program) before anything
is spawned. Adding a schedule: a module here with a ``@register_schedule("name")`` generator, its
import below, and ``configs/schedule/<name>.yaml``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from lowbw.errors import ConfigError
from lowbw.pipeline.actions import Schedule, add_communication, check_complete
from lowbw.pipeline.program import validate_schedule
from lowbw.pipeline.schedules import classic, interleaved, pipedream_2bw, v_shape, zero_bubble  # noqa: F401  (register)
from lowbw.pipeline.schedules.classic import forward_only, gpipe, one_f_one_b
from lowbw.pipeline.schedules.registry import SCHEDULES, register_schedule

__all__ = ["SCHEDULES", "build_schedule", "forward_only", "gpipe", "one_f_one_b", "register_schedule"]


def build_schedule(cfg: Any, p: int, m: int) -> Schedule:
    """Generate (or read from CSV), lower and validate the training schedule named by ``cfg.name``."""
    name = cfg.name
    if name == "csv":
        if not getattr(cfg, "csv", None):
            raise ConfigError("schedule=csv needs schedule.csv=<path of a per-rank action CSV>")
        try:
            sched = Schedule.from_csv(cfg.csv)
        except (OSError, ValueError) as e:
            raise ConfigError(f"schedule.csv={cfg.csv!r}: {e}") from None
        if sched.n_ranks != p or sched.n_microbatches != m:
            raise ConfigError(
                f"schedule.csv={cfg.csv!r} is for {sched.n_ranks} ranks and {sched.n_microbatches} microbatches, "
                f"the run has pipeline.stages={p} and pipeline.microbatches={m}"
            )
    else:
        if name not in SCHEDULES:
            raise ConfigError(f"unknown schedule {name!r}; known schedules: {', '.join(sorted(SCHEDULES))}, csv")
        extra = {k: v for k, v in _params(cfg).items() if k not in ("name", "csv")}
        built = SCHEDULES[name](p, m, **_accepted(SCHEDULES[name], extra))
        if isinstance(built, Schedule):  # a generator that lowers and validates its own (pipedream_2bw)
            return built
        rows, stage_to_rank, *pairs = built
        overlaps = pairs[0] if pairs else frozenset()
        sched = Schedule(name, len(stage_to_rank), m, stage_to_rank, add_communication(rows, stage_to_rank, overlaps),
                         overlaps)
    check_complete(sched)  # names a missing action before playing could only say where it deadlocks
    validate_schedule(sched)
    return sched


def _params(cfg: Any) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(vars(cfg)) if hasattr(cfg, "__dict__") else {}


def _accepted(fn: Callable, params: dict) -> dict:
    """The schedule fields a generator takes (e.g. virtual_stages is only for interleaved_1f1b)."""
    sig = inspect.signature(fn)
    if any(q.kind == q.VAR_KEYWORD for q in sig.parameters.values()):
        return params
    return {k: v for k, v in params.items() if k in sig.parameters}

"""The range of every numeric setting, checked before anything is spawned or simulated.

Types are Hydra's job (``train.steps=abc`` never gets here); ranges are this module's. Each
:class:`Limit` names a setting, its bounds and, where the bound is not obvious, why: most keep a
run from doing nothing useful for hours (a sleep of a minute per message on the wall clock) or from
exhausting memory (a row per step kept by the recorder, a schedule of millions of actions). A value
outside its range is one :class:`~lowbw.errors.ConfigError` sentence naming the setting and the limit.

Besides the per-setting ranges, two budgets bound what settings do together:

- :func:`check_memory` (lowbw-train): weights, gradients and AdamW state (16 bytes a parameter in
  float32), activations of a whole batch in flight (Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models", eq. 1: ``s*b*h*(34 + 5*a*s/h)`` bytes per layer in 16-bit,
  doubled for float32) and each rank process's own footprint, against the memory available here;
- :func:`check_simulation` (lowbw-simulate): the schedule's size (stages x microbatches) and the
  work of playing it (x steps).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from lowbw.errors import ConfigError

_ABSENT = object()
INT_MAX = 2**63 - 1


@dataclass(frozen=True)
class Limit:
    path: str  # dotted setting name
    lo: float
    hi: float
    integer: bool = False
    lo_open: bool = False  # lo itself not allowed
    hi_open: bool = False  # hi itself not allowed
    optional: bool = False  # None (null) allowed
    why: str = ""  # what the bound protects, shown in the error

    def text(self) -> str:
        kind = "an integer" if self.integer else "a number"
        lo, hi = ("(" if self.lo_open else "["), (")" if self.hi_open else "]")
        return f"{kind} in {lo}{_fmt(self.lo)}, {_fmt(self.hi)}{hi}"


def _fmt(x: float) -> str:
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{int(x):,}" if float(x).is_integer() and abs(x) >= 1 else f"{x:g}"


MINUTE_MS = 60_000.0  # a minute one way is beyond any terrestrial or geostationary link; longer only stalls
_WALL = "on the wall clock the run would wait that long for real"

#: lowbw-train's numeric settings.
TRAIN_LIMITS: tuple[Limit, ...] = (
    Limit("model.n_layer", 1, 1024, integer=True),
    Limit("model.n_embd", 1, 65536, integer=True),
    Limit("model.n_head", 1, 4096, integer=True),
    Limit("model.block_size", 1, 65536, integer=True),
    Limit("data.val_fraction", 0, 1, lo_open=True, hi_open=True),
    Limit("pipeline.stages", 1, 256, integer=True, why="one process per stage on this machine"),
    Limit("replicas.count", 1, 256, integer=True, why="one process per stage of every replica on this machine"),
    Limit("pipeline.microbatches", 1, 65536, integer=True),
    Limit("schedule.virtual_stages", 1, 64, integer=True),
    Limit("clock.flops_per_s", 0, 1e21, lo_open=True, optional=True),
    Limit("clock.forward_s", 0, 1e6, lo_open=True),
    Limit("clock.backward_s", 0, 1e6, lo_open=True),
    Limit("net.latency_ms", 0, MINUTE_MS, why=_WALL),
    Limit("net.jitter_ms", 0, MINUTE_MS, why=_WALL),
    Limit("net.uplink_mbps", 1e-3, math.inf, why="below 1 kbit/s a step's messages take hours"),
    Limit("net.downlink_mbps", 1e-3, math.inf, why="below 1 kbit/s a step's messages take hours"),
    Limit("net.loss_rate", 0, 1, hi_open=True),
    Limit("net.mss_bytes", 1, 65535, integer=True, why="a TCP segment size is a 16-bit field"),
    Limit("net.duplex_efficiency", 0, 1, lo_open=True, why="the fraction of the rate a direction keeps"),
    Limit("compress.error_every", 0, INT_MAX, integer=True),
    # The boundary sizes' ranges that hold for any model; each method checks the bound that depends on the
    # model (rank and width below model.n_embd) when it is built (lowbw.boundary).
    Limit("boundary.rank", 1, 65535, integer=True, why="subspace coordinates a token, fewer than model.n_embd"),
    Limit("boundary.width", 1, 65535, integer=True, why="bottleneck features a token, fewer than model.n_embd"),
    Limit("boundary.keep", 0, 1, lo_open=True, hi_open=True, why="the fraction of model.n_embd columns sent"),
    Limit("train.steps", 1, 1_000_000, integer=True, why="the recorder keeps a row of every step in memory"),
    Limit("train.batch_size", 1, 1_000_000, integer=True),
    Limit("train.lr", 0, math.inf, lo_open=True, hi_open=True),
    Limit("train.weight_decay", 0, math.inf, hi_open=True),
    Limit("train.muon_lr", 0, math.inf, lo_open=True, hi_open=True),
    Limit("train.muon_momentum", 0, 1, hi_open=True, why="Nesterov momentum coefficient"),
    Limit("train.grad_clip", 0, math.inf, hi_open=True, why="0 = off"),
    Limit("train.eval_interval", 0, INT_MAX, integer=True, why="0 = only at the end"),
    Limit("train.eval_batches", 0, 100_000, integer=True),
    Limit("train.warmup_steps", 0, 1_000_000, integer=True),
    Limit("faults.crash_rank", -1, 255, integer=True, why="-1 = none"),
    Limit("faults.crash_step", 0, INT_MAX, integer=True),
    Limit("faults.straggler_rank", -1, 255, integer=True, why="-1 = none"),
    Limit("faults.straggler_factor", 1, 1000, why=_WALL),
    Limit("faults.straggler_every", 0, INT_MAX, integer=True),
    Limit("faults.straggler_burst", 1, INT_MAX, integer=True),
    Limit("faults.bandwidth_walk.interval_s", 1e-3, 1e9),
    Limit("faults.bandwidth_walk.sigma", 0, 10),
    Limit("faults.bandwidth_walk.min_factor", 0, 1, lo_open=True),
    Limit("faults.bandwidth_walk.max_factor", 1, 1000),
    Limit("faults.bandwidth_walk.horizon_s", 0, 1e9, lo_open=True),
    Limit("checkpoint.every", 0, INT_MAX, integer=True, why="0 = none"),
    Limit("checkpoint.keep", 1, 1000, integer=True),
    Limit("seed", 0, 2**32 - 1, integer=True, why="numpy's and torch's generators take a non-negative seed"),
    Limit("timeout_s", 1, 86_400, why="below 1 s a busy machine fails healthy runs; a day is the longest wait"),
)

#: Points of a bandwidth walk (horizon_s / interval_s): each is kept in every rank's link model.
MAX_WALK_POINTS = 1_000_000
#: A schedule holds about 2.3 kB per stage and microbatch (measured: 341 MB for 128 stages x 1,024
#: microbatches of 1F1B, built and lowered in 16.6 s of CPU on the 2-core VM of docs/schedules.md).
MAX_SCHEDULE_CELLS = 262_144
#: Stage-microbatch-steps played by lowbw-simulate: scripts/bench_simulator.py plays 64 x 256 x 10 =
#: 163,840 in 4.8-9.6 s of CPU, so this is about 5-10 minutes.
MAX_SIMULATED_CELLS = 10_000_000
#: Resident memory of one rank's process before its model (measured: 333-346 MB for a tiny 2-stage run).
RANK_PROCESS_BYTES = 350 * 2**20


def _get(cfg: Any, path: str) -> Any:
    if isinstance(cfg, DictConfig):
        return OmegaConf.select(cfg, path, default=_ABSENT)
    node = cfg
    for part in path.split("."):
        if node is None:
            return _ABSENT
        node = node.get(part, _ABSENT) if isinstance(node, dict) else getattr(node, part, _ABSENT)
        if node is _ABSENT:
            return _ABSENT
    return node


def _inside(v: float, lim: Limit) -> bool:
    above = v > lim.lo if lim.lo_open else v >= lim.lo
    below = v < lim.hi if lim.hi_open else v <= lim.hi
    return above and below


def check_limits(cfg: Any, limits: tuple[Limit, ...]) -> None:
    """ConfigError for the first setting of ``limits`` outside its range (absent settings are skipped)."""
    for lim in limits:
        v = _get(cfg, lim.path)
        if v is _ABSENT or (v is None and lim.optional):
            continue
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
              and (not lim.integer or float(v).is_integer()) and _inside(v, lim))
        if not ok:
            why = f" ({lim.why})" if lim.why else ""
            raise ConfigError(f"{lim.path}={v!r} must be {lim.text()}{why}")


def check_walk_points(walk: Any) -> None:
    if walk is None or not walk.enabled:
        return
    points = walk.horizon_s / walk.interval_s
    if points > MAX_WALK_POINTS:
        raise ConfigError(f"faults.bandwidth_walk: horizon_s / interval_s = {points:,.0f} points, more than "
                          f"{MAX_WALK_POINTS:,} (each rank keeps them all); raise interval_s or lower horizon_s")


def check_schedule_size(stages: int, microbatches: int, virtual: int = 1) -> None:
    cells = stages * virtual * microbatches
    if cells > MAX_SCHEDULE_CELLS:
        raise ConfigError(f"pipeline.stages x schedule.virtual_stages x pipeline.microbatches = {cells:,} is more "
                          f"than {MAX_SCHEDULE_CELLS:,}: the schedule alone would take about "
                          f"{cells * 2.3e3 / 1e9:.1f} GB of memory; use fewer stages or microbatches")


def available_memory_bytes() -> Optional[int]:
    """MemAvailable (Linux), else physical memory; None when neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def train_memory_bytes(cfg: Any, ranks_here: int, world: int) -> float:
    """Estimated bytes the ranks on this machine need (see the module's docstring); ``world``: the ranks
    one copy of the model is cut across (a replica's)."""
    m, t = cfg.model, cfg.train
    d, L, T, a = m.n_embd, m.n_layer, m.block_size, m.n_head
    params = 12 * L * d * d + 2 * 256 * d + T * d  # blocks (Kaplan et al. 2020's 12 L d^2) + embeddings + head
    activations = 2 * T * t.batch_size * d * (34 + 5 * a * T / d) * L
    return ranks_here * (RANK_PROCESS_BYTES + (16 * params + activations) / world)


def check_memory(cfg: Any, ranks_here: int, world: int) -> None:
    need, have = train_memory_bytes(cfg, ranks_here, world), available_memory_bytes()
    if have is not None and need > have:
        raise ConfigError(f"this run needs about {need / 2**30:.1f} GiB of memory ({ranks_here} rank processes, "
                          f"model.n_layer={cfg.model.n_layer}, model.n_embd={cfg.model.n_embd}, train.batch_size="
                          f"{cfg.train.batch_size}, model.block_size={cfg.model.block_size}) but "
                          f"{have / 2**30:.1f} GiB are available; use a smaller model or batch")


#: lowbw-simulate's own numeric settings (the model and network ones are TRAIN_LIMITS').
SIMULATE_LIMITS: tuple[Limit, ...] = tuple(
    lim for lim in TRAIN_LIMITS if lim.path.split(".")[0] in ("model", "net", "schedule", "boundary") or lim.path == "seed"
) + (
    Limit("pipeline.stages", 1, 65536, integer=True),
    Limit("replicas.count", 1, 65536, integer=True),
    Limit("pipeline.microbatches", 1, 1_000_000, integer=True),
    Limit("train.batch_size", 1, 1e9, integer=True),
    Limit("sim.steps", 1, 100_000, integer=True),
    Limit("sim.warmup_steps", 0, 100_000, integer=True),
    Limit("sim.forward_s", 0, 1e6, lo_open=True),
    Limit("sim.backward_s", 0, 1e6, lo_open=True),
    Limit("sim.picture_steps", 0, 10, integer=True, why="every event of a pictured step goes into trace.json"),
)


def check_simulation(cfg: Any) -> None:
    """Every check of lowbw-simulate's inputs that needs no schedule: ranges, then the budgets."""
    check_limits(cfg, SIMULATE_LIMITS)
    p, m, steps = cfg.pipeline.stages, cfg.pipeline.microbatches, cfg.sim.steps
    v = _get(cfg, "schedule.virtual_stages")
    check_schedule_size(p, m, v if isinstance(v, int) and cfg.schedule.name == "interleaved_1f1b" else 1)
    played = p * m * steps
    if played > MAX_SIMULATED_CELLS:
        raise ConfigError(f"pipeline.stages x pipeline.microbatches x sim.steps = {played:,} is more than "
                          f"{MAX_SIMULATED_CELLS:,} (about 10 minutes of CPU); use fewer sim.steps")

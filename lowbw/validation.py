"""Check a composed config and build what every rank needs from it: the :class:`Plan`.

:func:`validate` checks what types cannot (ranges, divisibility, names, files) and raises
:class:`~lowbw.errors.ConfigError` (or ScheduleError) with one sentence naming the setting --
before any process is spawned. What it builds on the way (the schedules, the block partition, the
network topology and its conditions, the hardware profiles, the codec specs) is returned as a
:class:`Plan`, which the launcher hands to every rank, so nothing is built twice. Under torchrun
each rank validates its own copy of the config and gets the same plan.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from lowbw.boundary import build_method
from lowbw.compress import build_codec
from lowbw.config import plain
from lowbw.data.corpus import BUNDLED_BYTES, check_text_file, min_bytes
from lowbw.energy import HardwareProfile, make_network_model, profiles_for_ranks, select_meter
from lowbw.errors import ConfigError
from lowbw.models.gpt import ARCHS
from lowbw.models.modern import MLPS
from lowbw.limits import TRAIN_LIMITS, check_limits, check_memory, check_schedule_size, check_walk_points
from lowbw.net.conditions import Conditions, conditions_from_config
from lowbw.net.kernel import check_supported
from lowbw.net.topology import Topology
from lowbw.optim import OPTIMIZERS
from lowbw.pipeline.actions import Schedule
from lowbw.pipeline.partition import partition_layers
from lowbw.pipeline.schedules import build_schedule, forward_only
from lowbw.regime import Regime, build_regime
from lowbw.replicas import build_sync
from lowbw.replicas.layout import replica_count
from lowbw.replicas.charge import target_exchanges


@dataclass(frozen=True)
class Plan:
    """What a validated config resolves to: the same for every rank, built once."""

    schedule: Schedule  # training schedule, validated
    eval_schedule: Schedule  # forward-only, stages placed as in training
    ranges: tuple[tuple[int, int], ...]  # [first, last) block of each model stage (schedule.n_stages of them)
    topology: Topology
    conditions: Conditions  # outages, bandwidth traces, packet loss
    profiles: tuple[HardwareProfile, ...]  # one per rank
    codecs: dict[str, Any]  # "fwd" / "bwd" -> the codec spec (plain dict), checked
    regime: Optional[Regime] = None  # the target deployment the virtual clock times; None: the run's own model
    warnings: tuple[str, ...] = ()  # settings that are valid but will not do what they seem (printed at start)
    #: per rank of a replica, the target's exchange whose hops its replica messages are charged under a
    #: regime (lowbw.replicas.charge); empty: the run's own bytes
    sync_target: tuple[Any, ...] = ()


def positive(value: float, name: str, allow_inf: bool = False) -> None:
    """ConfigError unless ``value`` is a positive number (inf only when allowed)."""
    if value is None or math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        raise ConfigError(f"{name}={value} must be a positive number")


def validate(cfg: Any, world_size: Optional[int] = None) -> Plan:
    """Check a composed config (DictConfig or LowbwConfig); return its :class:`Plan`."""
    check_limits(cfg, TRAIN_LIMITS)
    _check_model(cfg.model)
    _check_optimizer(cfg.train)
    _check_run_shape(cfg, world_size)
    _check_clock(cfg)
    p, m = cfg.pipeline.stages, cfg.pipeline.microbatches
    n = p * replica_count(cfg)  # processes: every replica's ranks (lowbw.replicas.layout)
    check_schedule_size(p, m, cfg.schedule.virtual_stages if cfg.schedule.name == "interleaved_1f1b" else 1)
    check_walk_points(cfg.faults.bandwidth_walk)
    if getattr(cfg.net, "wire", "auto") not in ("auto", "gloo"):
        raise ConfigError(f"net.wire={cfg.net.wire!r}: use auto (shared memory between ranks of one host "
                          "where it works, gloo otherwise) or gloo")
    topology = Topology.from_config(cfg.net, n, seed=cfg.seed)
    conditions = conditions_from_config(cfg.faults, cfg.net, n)
    if getattr(cfg.net, "backend", "emulated") == "kernel":
        check_supported(topology, conditions, cfg)
    _check_faults(cfg.faults, n)
    schedule = build_schedule(cfg.schedule, p, m)  # generates and validates
    _check_replicas(cfg, schedule)
    ranges = _partition(cfg, schedule)
    codecs = {d: _check_codec(cfg.compress, d) for d in ("fwd", "bwd")}
    _check_boundary(cfg)
    profiles = profiles_for_ranks(cfg.hardware, n)
    make_network_model(cfg.energy)
    _check_meter(cfg)
    _check_outputs(cfg)
    _check_data(cfg)
    world = world_size or n
    check_memory(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", world)), p)
    regime = build_regime(cfg, schedule.n_stages)
    eval_schedule = forward_only(schedule.n_stages, m, schedule.stage_to_rank)
    sync_target = target_exchanges(cfg, schedule, replica_count(cfg)) if regime is not None else ()
    return Plan(schedule, eval_schedule, tuple(ranges), topology, conditions, tuple(profiles), codecs,
                regime, fault_warnings(cfg) + replica_warnings(cfg), sync_target)


def _check_replicas(cfg: Any, schedule: Schedule) -> None:
    """The synchronisation method and its parameters exist; replicas of what can be replicated."""
    replicas = getattr(cfg, "replicas", None)
    if replicas is None:
        return
    build_sync(plain(replicas.sync))  # ConfigError naming an unknown method, parameter or codec
    if replicas.count > 1 and schedule.asynchronous:
        raise ConfigError(f"replicas.count={replicas.count} with schedule={cfg.schedule.name}: replicas "
                          "synchronise at step boundaries, which an asynchronous schedule does not have; use a "
                          "synchronous schedule (1f1b, gpipe, ...) or replicas.count=1")
    if replicas.count * cfg.pipeline.stages > 256:
        raise ConfigError(f"replicas.count={replicas.count} x pipeline.stages={cfg.pipeline.stages} = "
                          f"{replicas.count * cfg.pipeline.stages} processes, more than the 256 one machine runs")


def replica_warnings(cfg: Any) -> tuple[str, ...]:
    """A synchronisation method chosen for a single pipeline, which has no replica to agree with."""
    replicas = getattr(cfg, "replicas", None)
    if replicas is None or replicas.count > 1:
        return ()
    spec = plain(replicas.sync)
    name = spec if isinstance(spec, str) else spec.get("name")
    if name == "allreduce" and (isinstance(spec, str) or spec.get("codec", "none") == "none"):
        return ()  # the default: nothing was asked for
    return (f"replicas/sync={name} with replicas.count=1: a single pipeline has no replica to synchronise with, "
            "so the method does nothing",)


def _check_data(cfg: Any) -> None:
    need = min_bytes(cfg.model.block_size, cfg.data.val_fraction)
    if cfg.data.path is not None:
        check_text_file(cfg.data.path, min_bytes=need)
    elif need > BUNDLED_BYTES:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} with model.block_size={cfg.model.block_size} "
                          f"needs a corpus of {need:,} bytes for one training and one validation sample; the bundled "
                          f"one has {BUNDLED_BYTES:,}: raise data.val_fraction or give data.path")


def _check_meter(cfg: Any) -> None:
    """energy.meter names a meter that exists and can measure here (auto and none always can)."""
    meter = cfg.energy.meter
    if meter not in ("auto", "none"):
        select_meter("cuda" if cfg.device == "cuda" else "cpu", meter)  # ConfigError saying how to fix it


def fault_warnings(cfg: Any) -> tuple[str, ...]:
    """Faults that are valid but will not happen as written (printed when the run starts)."""
    f, out = cfg.faults, []
    if f.crash_rank >= 0 and f.crash_step >= cfg.train.steps:
        out.append(f"faults.crash_step={f.crash_step} is not before the last step ({cfg.train.steps - 1}): "
                   f"rank {f.crash_rank} will not crash")
    if f.straggler_rank >= 0 and f.straggler_factor == 1:
        out.append(f"faults.straggler_rank={f.straggler_rank} with straggler_factor=1 slows nothing")
    for i, o in enumerate(f.outages or []):
        if cfg.clock.name == "wall" and o.end_s - o.start_s >= cfg.timeout_s:
            out.append(f"faults.outages[{i}] lasts {o.end_s - o.start_s:g} s on the wall clock, not less than "
                       f"timeout_s={cfg.timeout_s:g}: a rank waiting across it will stop the run with a dead-link "
                       f"error; raise timeout_s above {o.end_s - o.start_s:g} to ride it out")
    return tuple(out)


def _check_model(m: Any) -> None:
    for name in ("n_layer", "n_embd", "n_head", "block_size"):
        positive(getattr(m, name), f"model.{name}")
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_head={m.n_head} must divide model.n_embd={m.n_embd}")
    if m.vocab_size != 256:
        raise ConfigError(f"model.vocab_size={m.vocab_size}: tokens are bytes, so it must be 256")
    check_arch(m)


def check_arch(m: Any) -> None:
    """model.arch and the modern block's settings (lowbw-train and lowbw-simulate)."""
    if m.arch not in ARCHS:
        raise ConfigError(f"model.arch={m.arch!r} is not a block family; use one of {', '.join(ARCHS)}")
    if m.mlp is not None and m.mlp not in MLPS:
        raise ConfigError(f"model.mlp={m.mlp!r}: use one of {', '.join(MLPS)}")
    if m.arch == "gpt2" and (m.mlp not in (None, "gelu") or m.qk_norm):
        what = f"model.mlp={m.mlp}" if m.mlp not in (None, "gelu") else "model.qk_norm=true"
        raise ConfigError(f"{what} is a setting of the modern block, but model.arch=gpt2 is the fixed 2019 "
                          "block (LayerNorm, learned positions, GELU MLP); use model.arch=modern or leave it unset")
    if m.arch == "modern" and m.n_embd % m.n_head == 0 and (m.n_embd // m.n_head) % 2:
        raise ConfigError(f"model.n_embd / model.n_head = {m.n_embd // m.n_head} is odd, but rotary positions "
                          "(model.arch=modern) rotate pairs of channels: pick an even head width")


def _check_optimizer(t: Any) -> None:
    """The optimizer exists here (its numeric settings are ranged in lowbw/limits.py, checked before)."""
    if t.optimizer not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer={t.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    if t.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"train.optimizer=muon needs torch.optim.Muon (torch >= 2.9); this is torch "
                          f"{torch.__version__}: upgrade torch or use train.optimizer=adamw")


def _check_run_shape(cfg: Any, world_size: Optional[int]) -> None:
    p, t = cfg.pipeline, cfg.train
    positive(p.stages, "pipeline.stages")
    positive(p.microbatches, "pipeline.microbatches")
    positive(t.batch_size, "train.batch_size")
    positive(t.steps, "train.steps")
    positive(t.lr, "train.lr")
    positive(cfg.timeout_s, "timeout_s")
    if t.batch_size % p.microbatches:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by pipeline.microbatches={p.microbatches}; "
            "pick a batch size that is a multiple of the microbatch count"
        )
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must lie in (0, 1)")
    if t.eval_interval < 0:
        raise ConfigError(f"train.eval_interval={t.eval_interval} must be >= 0 (0 = validate only at the end)")
    if t.target_loss is not None:
        positive(t.target_loss, "train.target_loss")
        if not t.eval_interval and t.steps > 1:
            raise ConfigError(
                f"train.target_loss={t.target_loss} is read at validation passes, but train.eval_interval=0 "
                "validates only at the end; set train.eval_interval (e.g. 10) to see when the target is reached"
            )
    n = p.stages * replica_count(cfg)
    if world_size is not None and world_size != n:
        raise ConfigError(
            f"pipeline.stages={p.stages} x replicas.count={replica_count(cfg)} = {n} processes, but {world_size} "
            f"were started; start {n} processes or change pipeline.stages or replicas.count"
        )
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={cfg.device!r}: use auto, cpu or cuda")


def _check_clock(cfg: Any) -> None:
    c = cfg.clock
    if c.name not in ("wall", "virtual"):
        raise ConfigError(f"clock={c.name!r} is not a clock; use clock=wall or clock=virtual")
    if c.durations not in ("measured", "flops", "fixed"):
        raise ConfigError(f"clock.durations={c.durations!r}: use measured, flops or fixed")
    if c.name == "wall" and c.durations != "measured":
        raise ConfigError(f"clock.durations={c.durations!r} applies to clock=virtual only: on the wall clock "
                          "compute takes the time it really takes; drop it or use clock=virtual")
    if c.durations == "flops" and c.flops_per_s is not None:
        positive(c.flops_per_s, "clock.flops_per_s")
    if c.durations == "fixed":
        positive(c.forward_s, "clock.forward_s")
        positive(c.backward_s, "clock.backward_s")


def _check_faults(f: Any, p: int) -> None:
    if f.straggler_rank >= p or f.crash_rank >= p:
        raise ConfigError(f"faults name rank {max(f.straggler_rank, f.crash_rank)} but there are {p} ranks (0..{p - 1})")
    if f.straggler_rank >= 0 and not (f.straggler_factor >= 1 and f.straggler_every >= 0 and f.straggler_burst >= 1):
        raise ConfigError(f"faults.straggler_factor={f.straggler_factor} must be >= 1, straggler_every >= 0, "
                          "straggler_burst >= 1")


def _partition(cfg: Any, schedule: Schedule) -> list[tuple[int, int]]:
    """Block ranges of the schedule's model stages (several per rank for interleaved schedules).

    ``pipeline.partition`` lists blocks per model stage: ``pipeline.stages`` entries, or
    ``pipeline.stages x schedule.virtual_stages`` for interleaved schedules."""
    m, p = cfg.model, cfg.pipeline
    if schedule.n_stages != p.stages and schedule.n_stages > m.n_layer:  # every chunk needs a block
        per_rank = schedule.n_stages // p.stages
        fewer = "fewer virtual stages" if cfg.schedule.name == "interleaved_1f1b" else "fewer pipeline stages"
        raise ConfigError(
            f"schedule={cfg.schedule.name} cuts the model into {schedule.n_stages} chunks ({per_rank} per rank, "
            f"pipeline.stages={p.stages}) but model.n_layer={m.n_layer}; use more layers or {fewer}"
        )
    return partition_layers(m.n_layer, schedule.n_stages, p.partition)


def _check_codec(compress: Any, direction: str) -> Any:
    spec = plain(compress[direction] if hasattr(compress, "__getitem__") else getattr(compress, direction))
    try:
        codec = build_codec(spec)
    except ConfigError as e:
        raise ConfigError(f"compress.{direction}: {e}") from None
    if direction not in codec.directions:
        raise ConfigError(
            f"compress.{direction}: codec {codec.name!r} is for {' and '.join(codec.directions)} only; "
            f"pick another codec for compress/{direction}"
        )
    return spec


def _check_boundary(cfg: Any) -> None:
    """boundary.* against the model; a boundary method does not combine with a target regime yet."""
    method = build_method(cfg.boundary, cfg.model, cfg.seed)
    if method.name != "none" and cfg.regime.name != "none":
        raise ConfigError(f"boundary={method.name} with regime={cfg.regime.name}: the regime charges the target "
                          "model's dense messages and FLOPs, not the method's; use one of them (lowbw-simulate "
                          "times a boundary method at any size)")


def _check_outputs(cfg: Any) -> None:
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep < 1:
        raise ConfigError(f"checkpoint.every={cfg.checkpoint.every} must be >= 0 and checkpoint.keep="
                          f"{cfg.checkpoint.keep} >= 1")
    if cfg.schedule.name == "pipedream_2bw" and (cfg.resume or cfg.checkpoint.every):
        raise ConfigError(
            "schedule=pipedream_2bw keeps microbatches and weight versions in flight across steps, which "
            "checkpoints do not hold yet; use checkpoint.every=0 and resume=false"
        )
    if cfg.compress.error_every < 0:
        raise ConfigError(f"compress.error_every={cfg.compress.error_every} must be >= 0 (0 = never)")
    _check_baseline(cfg.compress.baseline_run)


def _check_baseline(base: Optional[str]) -> None:
    """compress.baseline_run: the folder of a completed run whose summary has a validation loss."""
    if base is None:
        return
    where = f"compress.baseline_run={base!r}"
    try:
        summary = json.loads((Path(base) / "summary.json").read_text())
    except OSError:
        raise ConfigError(f"{where} holds no summary.json; give the folder of a finished uncompressed run") \
            from None
    except ValueError:
        raise ConfigError(f"{where}: its summary.json is not JSON; give the folder of a finished run") from None
    if not isinstance(summary, dict) or summary.get("status") != "completed":
        status = summary.get("status") if isinstance(summary, dict) else None
        raise ConfigError(f"{where} is not a completed run (status {status!r}); give the folder of a finished run")
    val = summary.get("val_loss")
    if not isinstance(val, (int, float)) or isinstance(val, bool) or not math.isfinite(val):
        raise ConfigError(f"{where}: its summary.json has no validation loss (val_loss={val!r}) to compare with")

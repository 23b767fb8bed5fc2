"""Typed configuration: one dataclass per Hydra group, every field with its unit.

``configs/train.yaml`` composes these groups; ``lowbw-train key=value`` overrides any field and
Hydra checks the types against these dataclasses. :func:`validate` then checks what types cannot
(ranges, divisibility, names) and raises :class:`~lowbw.errors.ConfigError` before any process
is spawned.
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from lowbw.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "tiny"
    n_layer: int = 4  # transformer blocks, cut into pipeline stages
    n_embd: int = 64  # model width d_model
    n_head: int = 4  # attention heads; must divide n_embd
    block_size: int = 64  # context length in tokens (bytes)
    vocab_size: int = 256  # byte-level tokens
    dropout: float = 0.0  # kept 0 so that pipelined and single-process gradients compare exactly


@dataclass
class DataConfig:
    path: Optional[str] = None  # UTF-8 text file; null = the bundled tiny-shakespeare corpus
    val_fraction: float = 0.1  # fixed held-out tail of the file used as the validation split


@dataclass
class PipelineConfig:
    stages: int = 4  # pipeline stages = processes (one stage per rank)
    microbatches: int = 4  # microbatches per optimizer step; must divide train.batch_size
    partition: Optional[list[int]] = None  # blocks per stage, e.g. [1, 2, 1]; null = as even as possible


@dataclass
class ScheduleConfig:
    name: str = "1f1b"  # gpipe | 1f1b  (see lowbw.pipeline.schedules.SCHEDULES)
    csv: Optional[str] = None  # name=csv: path of a per-rank action CSV (torch.distributed.pipelining format)
    virtual_stages: int = 1  # name=interleaved_1f1b: model chunks per rank (v); the model is cut into stages*v parts


@dataclass
class ClockConfig:
    name: str = "wall"  # wall: really wait for the link; virtual: event time, nothing sleeps
    durations: str = "measured"  # virtual only. measured: thread CPU time | flops: FLOPs / flops_per_s | fixed
    flops_per_s: Optional[float] = None  # FLOP/s for durations=flops; null = each rank's hardware profile (peak x mfu)
    forward_s: float = 1.0  # s per forward of one microbatch on one stage, durations=fixed
    backward_s: float = 2.0  # s per backward of one microbatch on one stage, durations=fixed (GPipe paper: B = 2F)


@dataclass
class PairConfig:
    latency_ms: Optional[float] = None  # one-way latency override for this pair, ms
    bandwidth_mbps: Optional[float] = None  # bandwidth cap for this pair, Mbit/s


@dataclass
class RandomLinksConfig:
    seed: int = 0  # seed of the per-pair draws
    latency_ms: list[float] = field(default_factory=lambda: [1.0, 100.0])  # one-way, uniform in [lo, hi], ms
    bandwidth_mbps: list[float] = field(default_factory=lambda: [10.0, 1000.0])  # log-uniform in [lo, hi], Mbit/s


@dataclass
class NetEnergyConfig:
    """The energy of the preset's link class, read by ``energy.network=link_class`` (docs/energy.md).
    Defaults: home broadband, as configs/net/home.yaml, which gives the sources (Malmodin 2020)."""

    link_class: str = "home"  # which kind of link the numbers describe: ideal | datacenter | lan | wan | home
    # W per node that exchanges bytes, for the whole run: equipment the node holds (here a home broadband line)
    access_power_w: float = 18.0
    j_per_bit: float = 7.0e-8  # J per bit sent through equipment shared with other traffic (here 2 access lines + core)
    sources: dict[str, str] = field(default_factory=dict)  # number name -> where it comes from


@dataclass
class NetConfig:
    name: str = "home"
    semantics: str = "pipelined"  # pipelined: latencies overlap (open TCP window) | serialized: 8b/B + latency per message
    latency_ms: float = 25.0  # one-way latency of every directed pair, ms
    jitter_ms: float = 0.0  # mean extra one-way delay, exponential, FIFO kept, ms
    uplink_mbps: float = 20.0  # each node's send bandwidth, Mbit/s (1 Mbit = 1e6 bit)
    downlink_mbps: float = 100.0  # each node's receive bandwidth, Mbit/s
    regions: list[str] = field(default_factory=list)  # rank r sits in regions[r % len(regions)]
    pairs: dict[str, PairConfig] = field(default_factory=dict)  # "a-b" both ways, "a->b" one way
    random: Optional[RandomLinksConfig] = None  # seeded heterogeneous links
    emulate: bool = True  # false: no emulated delay on top of the real transport (real WAN runs)
    loss_rate: float = 0.0  # packet loss probability; caps each pair at the Mathis TCP ceiling (lowbw/net/conditions.py)
    mss_bytes: int = 1460  # TCP maximum segment size for the Mathis ceiling, bytes (Ethernet MTU 1500 - 40)
    energy: NetEnergyConfig = field(default_factory=NetEnergyConfig)  # network energy of this link class (W, J/bit)


@dataclass
class CodecConfig:
    name: str = "none"


@dataclass
class CompressConfig:
    fwd: Any = field(default_factory=lambda: {"name": "none"})  # codec of forward activations
    bwd: Any = field(default_factory=lambda: {"name": "none"})  # codec of backward activation-gradients
    error_every: int = 1  # steps between measurements of the reconstruction error (0 = never); not timed
    baseline_run: Optional[str] = None  # run folder of an uncompressed run, same seed: summary gets the loss gap


@dataclass
class TrainConfig:
    steps: int = 20  # optimizer steps
    batch_size: int = 8  # sequences per optimizer step (all microbatches)
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 0.0  # global grad-norm clip per stage; 0 = off (clipping per stage is not global clipping)
    eval_interval: int = 0  # steps between validation passes; 0 = only at the end
    eval_batches: int = 4  # batches of batch_size sequences per validation pass
    warmup_steps: int = 1  # leading steps excluded from tokens/s (start-up effects)


@dataclass
class OutageConfig:
    link: str = "*"  # "src->dst" (ranks) or "*" for every link
    start_s: float = 0.0  # s on the run clock when the link goes down
    end_s: float = 0.0  # s on the run clock when it comes back


@dataclass
class BandwidthWalkConfig:
    seed: int = 0  # seed of the walk
    interval_s: float = 1.0  # s between changes, run clock
    sigma: float = 0.3  # std of the log-factor step
    min_factor: float = 0.1  # lowest bandwidth multiplier
    max_factor: float = 1.0  # highest bandwidth multiplier
    horizon_s: float = 3600.0  # s of run clock covered; the last factor holds after it


@dataclass
class FaultsConfig:
    crash_rank: int = -1  # rank that exits abruptly at crash_step (recovery experiments); -1 = none
    crash_step: int = 0  # step at which it exits
    straggler_rank: int = -1  # rank whose compute is slowed; -1 = none
    straggler_factor: float = 1.0  # its compute takes this many times as long
    straggler_every: int = 0  # steps between the starts of slow bursts; 0 = slow all the time
    straggler_burst: int = 1  # steps per slow burst
    outages: list[OutageConfig] = field(default_factory=list)  # link-down windows
    bandwidth_trace: Optional[str] = None  # CSV "time_s,factor" or "time_s,mbps", piecewise constant
    bandwidth_walk: Optional[BandwidthWalkConfig] = None  # seeded random walk of the bandwidth factor


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 = none
    dir: Optional[str] = None  # null = <run folder>/checkpoints
    keep: int = 2  # newest checkpoints kept per rank


@dataclass
class LowbwConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    clock: ClockConfig = field(default_factory=ClockConfig)
    net: NetConfig = field(default_factory=NetConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: bool = False  # continue from the newest checkpoint every rank has (out_dir = the run's folder)
    hardware: Any = field(default_factory=lambda: {"name": "cpu_local"})  # configs/hardware: per-node profile
    energy: Any = field(default_factory=lambda: {"network": "intensity", "meter": "auto"})  # configs/energy
    seed: int = 1337  # seeds weights, batches and link jitter
    device: str = "auto"  # auto: cuda:LOCAL_RANK when a GPU is there, else cpu | cpu | cuda
    backend: str = "gloo"  # torch.distributed backend for the stage-to-stage transport
    timeout_s: float = 60.0  # s (wall) a rank waits for a peer before failing with an error naming it
    progress: bool = True  # progress bar on rank 0
    out_dir: Optional[str] = None  # where run files go; null = Hydra's run folder


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="lowbw_schema", node=LowbwConfig)


# ---- validation ---------------------------------------------------------------------------


def _positive(value: float, name: str, allow_inf: bool = False) -> None:
    if value is None or math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        raise ConfigError(f"{name}={value} must be a positive number")


def validate(cfg: Any, world_size: Optional[int] = None) -> None:
    """Check a composed config (DictConfig or LowbwConfig); raise ConfigError naming the setting."""
    from lowbw.net.topology import Topology
    from lowbw.pipeline.partition import partition_layers
    from lowbw.pipeline.schedules import build_schedule

    m, p, t = cfg.model, cfg.pipeline, cfg.train
    for name in ("n_layer", "n_embd", "n_head", "block_size"):
        _positive(getattr(m, name), f"model.{name}")
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_head={m.n_head} must divide model.n_embd={m.n_embd}")
    if m.vocab_size != 256:
        raise ConfigError(f"model.vocab_size={m.vocab_size}: tokens are bytes, so it must be 256")
    _positive(p.stages, "pipeline.stages")
    _positive(p.microbatches, "pipeline.microbatches")
    _positive(t.batch_size, "train.batch_size")
    _positive(t.steps, "train.steps")
    _positive(t.lr, "train.lr")
    _positive(cfg.timeout_s, "timeout_s")
    if t.batch_size % p.microbatches:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by pipeline.microbatches={p.microbatches}; "
            "pick a batch size that is a multiple of the microbatch count"
        )
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must lie in (0, 1)")
    if world_size is not None and world_size != p.stages:
        raise ConfigError(
            f"pipeline.stages={p.stages} but {world_size} processes were started; "
            f"pass pipeline.stages={world_size} or start {p.stages} processes"
        )
    if cfg.clock.name not in ("wall", "virtual"):
        raise ConfigError(f"clock={cfg.clock.name!r} is not a clock; use clock=wall or clock=virtual")
    if cfg.clock.durations not in ("measured", "flops", "fixed"):
        raise ConfigError(f"clock.durations={cfg.clock.durations!r}: use measured, flops or fixed")
    if cfg.clock.durations == "flops" and cfg.clock.flops_per_s is not None:
        _positive(cfg.clock.flops_per_s, "clock.flops_per_s")
    if cfg.clock.durations == "fixed":
        _positive(cfg.clock.forward_s, "clock.forward_s")
        _positive(cfg.clock.backward_s, "clock.backward_s")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={cfg.device!r}: use auto, cpu or cuda")
    partition_layers(m.n_layer, p.stages, p.partition)
    Topology.from_config(cfg.net, p.stages, seed=cfg.seed)
    from lowbw.net.conditions import conditions_from_config

    conditions_from_config(cfg.faults, cfg.net, p.stages)
    f = cfg.faults
    if f.straggler_rank >= p.stages or f.crash_rank >= p.stages:
        raise ConfigError(f"faults name rank {max(f.straggler_rank, f.crash_rank)} but there are {p.stages} ranks (0..{p.stages - 1})")
    if f.straggler_rank >= 0 and not (f.straggler_factor >= 1 and f.straggler_every >= 0 and f.straggler_burst >= 1):
        raise ConfigError(f"faults.straggler_factor={f.straggler_factor} must be >= 1, straggler_every >= 0, straggler_burst >= 1")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep < 1:
        raise ConfigError(f"checkpoint.every={cfg.checkpoint.every} must be >= 0 and checkpoint.keep={cfg.checkpoint.keep} >= 1")
    sched = build_schedule(cfg.schedule, p.stages, p.microbatches)  # generates and validates
    if sched.n_stages != p.stages:  # several model chunks per rank (interleaved): every chunk needs a block
        if sched.n_stages > m.n_layer:
            raise ConfigError(
                f"schedule={cfg.schedule.name} cuts the model into {sched.n_stages} chunks (pipeline.stages={p.stages} x "
                f"schedule.virtual_stages) but model.n_layer={m.n_layer}; use more layers or fewer virtual stages"
            )
        partition_layers(m.n_layer, sched.n_stages, p.partition)
    from lowbw.compress import build_codec

    for direction in ("fwd", "bwd"):
        spec = cfg.compress[direction] if hasattr(cfg.compress, "__getitem__") else getattr(cfg.compress, direction)
        try:
            codec = build_codec(_plain(spec))
        except ConfigError as e:
            raise ConfigError(f"compress.{direction}: {e}") from None
        if direction not in codec.directions:
            raise ConfigError(
                f"compress.{direction}: codec {codec.name!r} is for {' and '.join(codec.directions)} only; "
                f"pick another codec for compress/{direction}"
            )
    from lowbw.energy import make_network_model, profiles_for_ranks

    profiles_for_ranks(cfg.hardware, p.stages)
    make_network_model(cfg.energy)
    if cfg.compress.error_every < 0:
        raise ConfigError(f"compress.error_every={cfg.compress.error_every} must be >= 0 (0 = never)")
    if cfg.compress.baseline_run is not None and not (Path(cfg.compress.baseline_run) / "summary.json").is_file():
        raise ConfigError(f"compress.baseline_run={cfg.compress.baseline_run!r} holds no summary.json; "
                          "give the folder of a finished uncompressed run")
    if cfg.data.path is not None:
        from lowbw.data.corpus import check_text_file, min_bytes

        check_text_file(cfg.data.path, min_bytes=min_bytes(m.block_size, cfg.data.val_fraction))


def _plain(node: Any) -> Any:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node

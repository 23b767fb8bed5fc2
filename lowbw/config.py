"""Typed configuration: one dataclass per Hydra group, every field with its unit.

``configs/train.yaml`` composes these groups; ``lowbw-train key=value`` overrides any field and
Hydra checks the types against these dataclasses. :func:`lowbw.validation.validate` then checks what
types cannot (ranges -- each numeric field's in lowbw.limits --, divisibility, names), raising
:class:`~lowbw.errors.ConfigError` before any process is spawned, and hands what it built to the ranks.
This module is a leaf: it imports nothing else of lowbw.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Mapping
from importlib import resources
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf


@dataclass
class ModelConfig:
    name: str = "tiny"
    n_layer: int = 4  # transformer blocks, cut into pipeline stages
    n_embd: int = 64  # model width d_model
    n_head: int = 4  # attention heads; must divide n_embd
    block_size: int = 64  # context length in tokens (bytes)
    vocab_size: int = 256  # byte-level tokens
    arch: str = "modern"  # block: modern (RMSNorm, rotary positions, no biases) | gpt2 (LayerNorm, learned positions, GELU)
    mlp: Optional[str] = None  # modern block's MLP: gelu | relu2 (squared ReLU) | swiglu; null = relu2 (gpt2: GELU only)
    qk_norm: Optional[bool] = None  # modern block: RMS-normalise queries and keys per head; null = true (gpt2: none)


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
class ReplicasConfig:
    """Data-parallel replicas of the whole pipeline (lowbw/replicas, docs/replicas.md): ``count`` x
    ``pipeline.stages`` processes, rank = replica x (the schedule's ranks) + the rank within the replica."""

    count: int = 1  # R: copies of the pipeline, each on its own data; 1 = a single pipeline
    sync: Any = field(default_factory=lambda: {"name": "allreduce"})  # how a stage's replicas agree (configs/replicas/sync)


@dataclass
class ScheduleConfig:
    name: str = "1f1b"  # a registered generator (lowbw.pipeline.schedules.SCHEDULES: gpipe, 1f1b, zbv, ...) or csv
    csv: Optional[str] = None  # name=csv: path of a per-rank action CSV (torch.distributed.pipelining format)
    virtual_stages: int = 1  # name=interleaved_1f1b: model chunks per rank (v); the model is cut into stages*v parts


@dataclass
class ClockConfig:
    name: str = "wall"  # wall: really wait for the link; virtual: event time, nothing sleeps
    # virtual only. flops: FLOPs / flops_per_s, the same on every machine | measured: thread CPU time of this
    # machine (machine-dependent) | fixed: forward_s, backward_s
    durations: str = "flops"
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
    backend: str = "emulated"  # emulated: lowbw's link model on loopback | kernel: a network namespace per rank, links shaped by tc (root, Linux; docs/networks.md)
    loss_rate: float = 0.0  # packet loss probability; caps each pair at the Mathis TCP ceiling (lowbw/net/conditions.py)
    mss_bytes: int = 1460  # TCP maximum segment size (payload per segment), bytes: Ethernet MTU 1500 - 40 of headers
    framing: str = "payload"  # bits charged per message: payload (8 a payload byte) | line (+ headers and framing per segment)
    tcp_ip_header_bytes: int = 40  # framing=line: IPv4 20 (RFC 791) + TCP 20 (RFC 9293) header bytes per segment, no options
    ethernet_overhead_bytes: int = 38  # framing=line: preamble+SFD 8, MAC header 14, FCS 4, inter-frame gap 12 (IEEE 802.3), bytes
    wire: str = "auto"  # what carries messages between ranks: auto (ranks of one host pass activations and gradients through shared memory where it works -- Linux, x86-64 -- the rest over gloo; lowbw/net/shm.py) | gloo (every message over gloo, TCP)
    duplex_efficiency: float = 1.0  # fraction of a pair's rate each direction keeps while both carry data at once (two-way TCP: ACKs queue behind the reverse data; docs/networks.md); 1 = independent directions
    energy: NetEnergyConfig = field(default_factory=NetEnergyConfig)  # network energy of this link class (W, J/bit)


@dataclass
class CompressConfig:
    fwd: Any = field(default_factory=lambda: {"name": "none"})  # codec of forward activations
    bwd: Any = field(default_factory=lambda: {"name": "none"})  # codec of backward activation-gradients
    error_every: int = 1  # steps between measurements of the reconstruction error (0 = never); not timed
    baseline_run: Optional[str] = None  # run folder of an uncompressed run, same seed: summary gets the loss gap


@dataclass
class BoundaryConfig:
    """What the model sends across a stage boundary by construction (``boundary=<name>``; docs/compression.md).
    Codecs (``compress/fwd``, ``compress/bwd``) still apply on what crosses."""

    name: str = "none"  # none (the residual stream, d floats a token) | subspace | bottleneck | columns
    rank: int = 16  # subspace: k, coordinates per token in the shared basis U (d x k); 1 <= rank < n_embd
    match_params: bool = False  # subspace: widen every MLP so a block has as many parameters as the dense block
    width: int = 8  # bottleneck: w, features per token the encoder sends; 1 <= width < n_embd
    keep: float = 0.1  # columns: fraction of the n_embd features sent (round(keep x n_embd) columns, at least 1)


@dataclass
class TrainConfig:
    steps: int = 20  # optimizer steps
    batch_size: int = 8  # sequences per optimizer step (all microbatches)
    optimizer: str = "adamw"  # adamw: AdamW on everything | muon: torch.optim.Muon on the blocks' matrices, AdamW on the rest | sgd: plain SGD
    lr: float = 1e-3  # AdamW (or SGD) learning rate (optimizer=muon: of the parameters Muon does not take)
    weight_decay: float = 0.0  # decoupled weight decay of AdamW and of Muon (per step, multiplied by each one's lr); SGD: L2 added to the gradient
    muon_lr: float = 0.02  # optimizer=muon: a step moves a matrix by muon_lr x sqrt(max(1, rows/cols)) x an orthogonal update
    muon_momentum: float = 0.95  # optimizer=muon: Muon's Nesterov momentum coefficient, in [0, 1)
    grad_clip: float = 0.0  # max L2 norm of all stages' gradients together (one all-reduce per step); 0 = off
    eval_interval: int = 0  # steps between validation passes; 0 = only at the end
    eval_batches: int = 4  # batches of batch_size sequences per validation pass
    warmup_steps: int = 1  # leading steps excluded from tokens/s (start-up effects)
    # validation loss (nats/token) to reach: summary.json records the step, tokens, run-clock time, wall time and
    # joules at which validation first reached it (lowbw.metrics.target); null = no target
    target_loss: Optional[float] = None


@dataclass
class RegimeConfig:
    """The deployment whose timing the virtual clock runs on (lowbw/regime.py, docs/time_to_loss.md).

    The run trains its own (small) model; with a target model, each compute action is charged the target's
    FLOPs for that stage on the run's ``hardware`` profile, and each message the time the target's message
    would take after the same codec. ``net``, ``schedule``, ``pipeline.stages`` and
    ``pipeline.microbatches`` are the run's own and the target's alike."""

    name: str = "none"  # none: the clock times the model being trained | a label of the target (configs/regime/)
    model: Optional[ModelConfig] = None  # the target model (a configs/model preset); null = none
    activation_dtype: str = "bfloat16"  # dtype of the target's activations and gradients before the codec


@dataclass
class OutageConfig:
    link: str = "*"  # "src->dst" (ranks) or "*" for every link
    start_s: float = 0.0  # s on the run clock when the link goes down
    end_s: float = 0.0  # s on the run clock when it comes back


@dataclass
class BandwidthWalkConfig:
    enabled: bool = False  # true: every link's bandwidth follows this walk (a settable group, never null)
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
    bandwidth_walk: BandwidthWalkConfig = field(default_factory=BandwidthWalkConfig)  # seeded walk of the factor


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
    replicas: ReplicasConfig = field(default_factory=ReplicasConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    clock: ClockConfig = field(default_factory=ClockConfig)
    net: NetConfig = field(default_factory=NetConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    boundary: BoundaryConfig = field(default_factory=BoundaryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    regime: RegimeConfig = field(default_factory=RegimeConfig)  # configs/regime: the deployment the clock times
    resume: bool = False  # continue from the newest checkpoint every rank has (out_dir = the run's folder)
    hardware: Any = field(default_factory=lambda: {"name": "cpu_local"})  # configs/hardware: per-node profile
    energy: Any = field(default_factory=lambda: {"network": "intensity", "meter": "auto"})  # configs/energy
    seed: int = 1337  # seeds weights, batches and link jitter
    device: str = "auto"  # auto: cuda:LOCAL_RANK when a GPU is there, else cpu | cpu | cuda
    timeout_s: float = 60.0  # s (wall) a rank waits for a peer before failing with an error naming it, in [1, 86400]
    progress: bool = True  # progress bar on rank 0
    out_dir: Optional[str] = None  # where run files go; null = Hydra's run folder


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="lowbw_schema", node=LowbwConfig)
    register_resolvers()


def register_resolvers() -> None:
    """The interpolations the apps' configs use: ``${lowbw_options:<group>}`` and ``${lowbw_run_dir:...}``."""
    OmegaConf.register_new_resolver("lowbw_options", group_options, replace=True)
    OmegaConf.register_new_resolver("lowbw_run_dir", run_folder, replace=True)


#: Environment variable naming a torchrun rank's scratch run folder (removed when the process ends).
SCRATCH_ENV = "LOWBW_SCRATCH_RUN_DIR"


def run_folder(out_dir: Optional[str], default: str) -> str:
    """Hydra's run folder: ``out_dir`` when given, else ``default``. Under torchrun only rank 0 keeps one:
    the other ranks get a scratch folder that is removed when their process ends (nothing left in /tmp)."""
    if os.environ.get("RANK", "0") != "0" and "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if SCRATCH_ENV not in os.environ:
            os.environ[SCRATCH_ENV] = tempfile.mkdtemp(prefix=f"lowbw-rank{os.environ['RANK']}-")
            atexit.register(shutil.rmtree, os.environ[SCRATCH_ENV], True)
        return os.environ[SCRATCH_ENV]
    return out_dir if out_dir else default


def group_options(group: str) -> str:
    """The options of a config group, as ``configs/<group>/*.yaml`` ships them (for ``--help``)."""
    folder = resources.files("lowbw_configs").joinpath(group)
    return ", ".join(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")))


def plain(node: Any) -> Any:
    """A config node as plain Python containers: a DictConfig/ListConfig resolved, another mapping as a
    dict, anything else as it is."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node) if isinstance(node, Mapping) else node

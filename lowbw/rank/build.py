"""Build one rank from typed parts: :func:`build_rank` returns a :class:`Rank`.

Every part comes from the config and the :class:`~lowbw.validation.Plan` the launcher validated
(the schedule, the block partition, the topology and its conditions, the hardware profiles, the
codec specs), so a rank builds nothing twice and builds nothing the checks have not seen. The same
builders serve real runs and the check harnesses in lowbw.testing: what is tested is what runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from lowbw.boundary import build_method
from lowbw.data.corpus import Corpus
from lowbw.energy import EnergyMeter, HardwareProfile, select_meter
from lowbw.models.flops import count_stage_flops
from lowbw.models.gpt import GPTStage
from lowbw.net.clock import Clock, make_clock, planned_durations
from lowbw.net.link import LinkModel
from lowbw.net.liveness import LinkWatch
from lowbw.net.shm import ShmWire
from lowbw.net.transport import CH_BWD, CH_FWD, CONTROL_TAGS, PIPELINE_TAGS, Transport
from lowbw.net.wire import GLOO_TIMEOUT, GlooWire, Wire
from lowbw.optim import build_optimizer
from lowbw.pipeline.durations import planner
from lowbw.pipeline.executor import Executor
from lowbw.pipeline.stage import BoundaryCodecs, StageRuntime
from lowbw.pipeline.weight_stash import WeightStash
from lowbw.replicas import Layout, SyncMethod, build_sync
from lowbw.replicas.collective import ReplicaGroup
from lowbw.validation import Plan


@dataclass
class Rank:
    """Everything one process of a run holds."""

    cfg: Any
    plan: Plan
    rank: int
    world: int
    device: torch.device
    stages: dict[int, StageRuntime]  # model stages held by this rank, by stage index
    clock: Clock
    link: Optional[LinkModel]  # None: no emulation (net.emulate=false)
    transport: Transport
    executor: Executor
    optimizer: torch.optim.Optimizer
    corpus: Corpus
    meter: EnergyMeter
    #: seconds charged for the optimizer step: None = measured, 0.0 under planned durations
    optimizer_seconds: Optional[float]
    watch: LinkWatch  # liveness verdicts for the transport and the collectives (lowbw.net.liveness)
    layout: Layout  # replicas: which replica and pipeline rank this rank is (lowbw.replicas.layout)
    group: ReplicaGroup  # the ranks holding the same stages in the other replicas
    sync: SyncMethod  # how they stay in agreement (replicas/sync)

    @functools.cached_property
    def parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter of this rank's stages, in stage order, listed once: walking the modules for them
        took 0.3 ms at every step's end, on the critical path (scripts/bench_overhead.py, interleaved 1F1B)."""
        return [p for st in self.stages.values() for p in st.module.parameters()]

    @property
    def replica(self) -> int:
        return self.layout.replica_of(self.rank)

    @property
    def profile(self) -> HardwareProfile:
        return self.plan.profiles[self.rank]


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no CUDA device; use device=cpu or device=auto")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def build_stages(cfg: Any, plan: Plan, rank: int, device: torch.device) -> dict[int, StageRuntime]:
    """The model stages this rank holds, with weights seeded per block (the same as in one process)."""
    last = plan.schedule.n_stages - 1
    method = build_method(cfg.boundary, cfg.model, cfg.seed)
    stages = {}
    for s in plan.schedule.stages_of(rank):
        module = GPTStage(cfg.model, *plan.ranges[s], is_first=(s == 0), is_last=(s == last), seed=cfg.seed,
                          method=method, index=s)
        stages[s] = StageRuntime(s, module.to(device), BoundaryCodecs.build(plan.codecs["fwd"], plan.codecs["bwd"]),
                                 sends_tokens=method.sends_tokens)
    return stages


def build_link(plan: Plan, rank: int, seed: int) -> Optional[LinkModel]:
    return LinkModel(plan.topology, rank, seed=seed, conditions=plan.conditions) if plan.topology.emulate else None


def stage_seconds(cfg: Any, plan: Plan, rank: int, stages: dict[int, StageRuntime],
                  device: torch.device) -> Optional[dict[int, tuple[float, float]]]:
    """(forward_s, backward_s) of one microbatch per held stage under planned durations; None = measured.
    FLOPs are the held module's, counted, or under a regime the target model's for that stage."""
    mode = planned_durations(cfg.clock)
    if mode is None:
        return None
    if mode == "fixed":
        return {s: (cfg.clock.forward_s, cfg.clock.backward_s) for s in stages}
    rate = cfg.clock.flops_per_s or plan.profiles[rank].effective_flops
    if plan.regime is not None:  # the target model's FLOPs for each stage (lowbw/regime.py)
        return {s: (plan.regime.stage_flops[s][0] / rate, plan.regime.stage_flops[s][1] / rate) for s in stages}
    mb, T, last = cfg.train.batch_size // cfg.pipeline.microbatches, cfg.model.block_size, plan.schedule.n_stages - 1
    out = {}
    for s, st in stages.items():
        ids = torch.zeros(mb, T, dtype=torch.long, device=device)
        x = ids if s == 0 else torch.zeros(mb, T, st.module.method.wire_width(), device=device)
        y = ids if s == last else None
        f, b = count_stage_flops(st.module, x, y, ids)
        out[s] = (f / rate, b / rate)
    return out


def message_charge(plan: Plan) -> Optional[dict[int, tuple[int, int]]]:
    """Channel -> (target, run) payload bytes the link model charges under a regime; None: payload lengths."""
    if plan.regime is None:
        return None
    return {CH_FWD: plan.regime.message_bytes["fwd"], CH_BWD: plan.regime.message_bytes["bwd"]}


def build_rank(cfg: Any, plan: Plan, rank: int, world: int, local_rank: int = 0, wire: Optional[Wire] = None,
               watch: Optional[LinkWatch] = None) -> Rank:
    """Build rank ``rank`` of ``world`` (a global rank: replica x the schedule's ranks + its rank in the
    schedule, lowbw.replicas.layout). ``wire``: what moves the bytes (default: gloo point-to-point; the
    process group must exist already); lowbw.testing.inproc passes an in-memory one. ``watch``: the liveness
    hook (a running heartbeat in real runs; None: plain verdicts)."""
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device, local_rank)
    clock = make_clock(cfg.clock.name, device)
    link = build_link(plan, rank, cfg.seed)
    watch = watch or LinkWatch()
    # a connection per direction, full duplex on real links: a collective, so only when every rank of the group
    # builds its rank (harnesses that run smaller pipelines in a larger group keep the default group)
    if wire is None and dist.is_initialized() and dist.get_world_size() == world:
        wire = GlooWire.per_direction(rank, world, GLOO_TIMEOUT, CONTROL_TAGS)
        if getattr(cfg.net, "wire", "auto") == "auto":  # peers on this host: activations and gradients by memory
            wire = ShmWire.connect(wire, rank, world, PIPELINE_TAGS)
    layout = Layout.of(cfg, plan.schedule.n_ranks)
    prank = layout.pipeline_rank(rank)
    transport = Transport(rank, link, clock, cfg.timeout_s, wire, charge=message_charge(plan), watch=watch)
    stages = build_stages(cfg, plan, prank, device)
    optimizer = build_optimizer(cfg.train, [st.module for st in stages.values()])
    corpus = Corpus(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction, cfg.seed)
    planned = planner(stage_seconds(cfg, plan, rank, stages, device))
    stash = WeightStash(prank, stages, last_step=cfg.train.steps - 1) if plan.schedule.asynchronous else None
    executor = Executor(prank, stages, transport, clock, device, planned, stash, base=layout.base(rank))
    meter = select_meter(str(device), cfg.energy.meter)
    opt_s = None if planned_durations(cfg.clock) is None else 0.0
    # under a regime, the target's parameters are charged (lowbw.replicas.charge)
    target = plan.sync_target[prank] if plan.sync_target else None
    group = ReplicaGroup(transport, clock, layout.group(rank), rank, planned=opt_s, target=target)
    replicas = getattr(cfg, "replicas", None)
    sync = build_sync(replicas.sync if replicas is not None else "allreduce")
    sync.bind([q for st in stages.values() for q in st.module.parameters()], group, cfg.seed)
    return Rank(cfg, plan, rank, world, device, stages, clock, link, transport, executor, optimizer, corpus,
                meter, opt_s, watch, layout, group, sync)

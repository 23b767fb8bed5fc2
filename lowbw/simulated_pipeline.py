"""What lowbw-simulate plays: the configured pipeline's schedule, compute seconds per stage and action,
message bytes and link models (:func:`setup_of`), and the steps played on them (:func:`play`).

Compute seconds come from ``sim.durations``: FLOPs over the hardware profile's effective rate, fixed
seconds, or a recorded run's timeline.jsonl. Message bytes are the boundary's activation shape times
``sim.activation_dtype`` divided by each codec's ``estimate_ratio``. lowbw.simulate checks the
settings first, and turns the played steps into the summary.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from lowbw.boundary import TOKEN_ID_BYTES, BoundaryMethod, build_method
from lowbw.compress import build_codec
from lowbw.config import FaultsConfig, plain
from lowbw.energy.profiles import HardwareProfile, profiles_for_ranks
from lowbw.errors import ConfigError
from lowbw.models.flops import stage_flops
from lowbw.net.conditions import conditions_from_config
from lowbw.net.link import LinkModel
from lowbw.net.topology import Topology
from lowbw.pipeline.actions import Action, Kind, Schedule
from lowbw.pipeline.durations import action_seconds
from lowbw.pipeline.player import Player, Program, compile_schedule
from lowbw.pipeline.schedules import build_schedule
from lowbw.pipeline.stepping import Steps, play_steps
from lowbw.replicas import Layout, build_sync
from lowbw.replicas.charge import rank_parts
from lowbw.replicas.simulated import ReplicaLinks, play_replicated


# ---- durations -----------------------------------------------------------------------------------

_KIND_OF_EVENT = {"forward": "F", "backward": "B", "backward_input": "I", "backward_weight": "W"}


def _durations_from_timeline(path: str, sched: Schedule) -> tuple[dict, dict, dict]:
    """(exact[(step, rank, label)], mean[(stage, kind)], optimizer[(step, rank)]) from a timeline.jsonl."""
    exact: dict[tuple[int, int, str], float] = {}
    sums: dict[tuple[int, Kind], list[float]] = {}
    opt: dict[tuple[int, int], float] = {}
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"sim.timeline={path!r}: no such file (a run's timeline.jsonl)")
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        e = json.loads(line)
        if e["kind"] == "optimizer":
            opt[(e["step"], e["rank"])] = e["end"] - e["start"]
        elif e["kind"] in _KIND_OF_EVENT:
            a = Action.parse(e["label"])
            dur = e["end"] - e["start"]
            exact[(e["step"], e["rank"], e["label"])] = dur
            acc = sums.setdefault((a.stage, a.kind), [0.0, 0])
            acc[0] += dur
            acc[1] += 1
    mean = {k: s / n for k, (s, n) in sums.items()}
    missing = {(s, k) for s in range(sched.n_stages) for k in (Kind.FORWARD,)} - set(mean)
    if missing:
        raise ConfigError(f"sim.timeline={path!r} has no forward of stage(s) {sorted(s for s, _ in missing)}: "
                          "is it a run of the same pipeline?")
    return exact, mean, opt


def _stage_time(cfg: Any, sched: Schedule, flops: list, profiles: list[HardwareProfile],
                mean: dict) -> Callable[[int, Kind], float]:
    """Seconds of one compute of ``kind`` on stage s, by ``sim.durations``."""
    sim = cfg.sim
    if sim.durations == "flops":
        def stage_time(s: int, kind: Kind) -> float:
            rate = profiles[sched.stage_to_rank[s]].effective_flops
            return action_seconds(kind, flops[s][0] / rate, flops[s][1] / rate)
    elif sim.durations == "fixed":
        def stage_time(s: int, kind: Kind) -> float:
            return action_seconds(kind, sim.forward_s, sim.backward_s)
    else:
        def stage_time(s: int, kind: Kind) -> float:
            if (s, kind) in mean:
                return mean[(s, kind)]
            if kind in (Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT) and (s, Kind.FULL_BACKWARD) in mean:
                return mean[(s, Kind.FULL_BACKWARD)] / 2
            if kind == Kind.FULL_BACKWARD and (s, Kind.BACKWARD_INPUT) in mean:
                return mean[(s, Kind.BACKWARD_INPUT)] + mean.get((s, Kind.BACKWARD_WEIGHT), 0.0)
            raise ConfigError(f"sim.timeline={sim.timeline!r} records no {kind.name} of stage {s}")
    return stage_time


class StageSeconds(dict):
    """Seconds per (stage, kind), worked out the first time a compute of that kind on that stage is
    played: so it holds exactly the kinds the schedule runs (what the summary's stage_seconds reports)."""

    def __init__(self, stage_time: Callable[[int, Kind], float]):
        super().__init__()
        self.stage_time = stage_time

    def __missing__(self, key: tuple[int, Kind]) -> float:
        seconds = self[key] = self.stage_time(*key)
        return seconds


# ---- messages and links --------------------------------------------------------------------------


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ConfigError(f"sim.activation_dtype={name!r} is not a torch dtype (e.g. bfloat16, float16, float32)")
    return dt


def _message_bytes(cfg: Any, shape: tuple[int, ...], method: BoundaryMethod) -> tuple[dict[Kind, int], dict[str, float]]:
    """Bytes of a forward and a backward message after the codecs, and each codec's ratio.

    ``shape``: (microbatch, T) tokens; each carries the method's wire width of values, and forward its
    token id too when the method sends them (lowbw.boundary)."""
    tokens = math.prod(shape)
    shape = (*shape, method.wire_width())
    dtype = _dtype(cfg.sim.activation_dtype)
    raw = math.prod(shape) * dtype.itemsize
    ratio = {}
    for direction in ("fwd", "bwd"):
        spec = plain(cfg.compress[direction]) if hasattr(cfg.compress, "__getitem__") else getattr(cfg.compress, direction)
        try:
            ratio[direction] = float(build_codec(spec).estimate_ratio(shape, dtype))
        except ConfigError as e:
            raise ConfigError(f"compress.{direction}: {e}") from None
    ids = tokens * TOKEN_ID_BYTES if method.sends_tokens else 0
    return {Kind.SEND_F: int(round(raw / ratio["fwd"])) + ids, Kind.SEND_B: int(round(raw / ratio["bwd"]))}, ratio


def _links(cfg: Any, p: int) -> tuple[Topology, dict[int, LinkModel]]:
    """The resolved net and one LinkModel per rank (with the packet-loss ceiling when net.loss_rate > 0)."""
    net = OmegaConf.to_object(cfg.net) if isinstance(cfg.net, DictConfig) else cfg.net  # plain: fast to read
    topo = Topology.from_config(net, p, seed=cfg.seed)
    conditions = conditions_from_config(FaultsConfig(), net, p)  # the simulator has no faults: loss only
    return topo, {r: LinkModel(topo, r, seed=cfg.seed, conditions=conditions) for r in range(p)}


# ---- what is played, and playing it ---------------------------------------------------------------


@dataclass
class Setup:
    """What a simulation is made of, before any step is played."""

    sched: Schedule
    prog: Program
    flops: list  # (forward, backward) FLOPs of one microbatch per stage
    fractional: bool  # stages cut finer than whole blocks
    profiles: list[HardwareProfile]
    table: StageSeconds  # s per (stage, kind)
    timeline: tuple[dict, dict]  # (exact durations, optimizer durations) of a recorded run, else empty
    msg_bytes: dict[Kind, int]
    ratio: dict[str, float]
    topo: Topology
    links: dict[int, LinkModel]  # one per rank, also when the net is not emulated (for link busy fractions)
    param_delta: int  # parameters the boundary method adds to the dense model (negative: removes)
    boundary: str  # the boundary method and its size, in words


def setup_of(cfg: Any) -> Setup:
    """Schedule, durations, message sizes and links of the configured pipeline."""
    model, pipe, sim = cfg.model, cfg.pipeline, cfg.sim
    mb = cfg.train.batch_size // pipe.microbatches
    sched = build_schedule(cfg.schedule, pipe.stages, pipe.microbatches)
    method = build_method(cfg.boundary, model, cfg.seed)
    flops, fractional = stage_flops(model, sched.n_stages, mb, plain(pipe.partition), counter=sim.flops == "counter",
                                    method=method)
    world = pipe.stages * cfg.replicas.count
    profiles = profiles_for_ranks(cfg.hardware, world)
    exact, mean, opt = _durations_from_timeline(sim.timeline, sched) if sim.durations == "timeline" else ({}, {}, {})
    table = StageSeconds(_stage_time(cfg, sched, flops, profiles, mean))
    msg_bytes, ratio = _message_bytes(cfg, (mb, model.block_size), method)
    topo, links = _links(cfg, world)
    return Setup(sched, compile_schedule(sched), flops, fractional, profiles, table, (exact, opt), msg_bytes, ratio,
                  topo, links, method.param_delta(sched.n_stages), method.describe())


def play(cfg: Any, setup: Setup, record: frozenset[int]) -> Steps:
    """The steps on the configured links: one Player for all (planned durations) or one per step (a run's)."""
    sim, prog, table, (exact, opt) = cfg.sim, setup.prog, setup.table, setup.timeline
    links = setup.links if setup.topo.emulate else None
    size = setup.msg_bytes.__getitem__

    def nbytes(a: Action) -> int:
        return size(a.kind)

    def step_player(step: int) -> Player:  # the run's own durations of this step, where it recorded them
        return Player(prog, lambda r, a: exact.get((step, r, str(a)), table[a[:2]]), nbytes, links)

    measured = [step >= sim.warmup_steps or sim.steps <= sim.warmup_steps for step in range(sim.steps)]
    if cfg.replicas.count > 1:
        return _play_replicas(cfg, setup, nbytes, measured, record)
    player = step_player if exact else Player(prog, lambda r, a: table[a[:2]], nbytes, links)  # a[:2]: (stage, kind)
    return play_steps(prog, player, sim.steps, measured, record, opt, sim.extrapolate)


def _play_replicas(cfg: Any, setup: Setup, nbytes: Callable[[Action], int], measured: list[bool],
                   record: frozenset[int]) -> Steps:
    """R pipelines and their replica groups' exchanges, every step played (lowbw.replicas.simulated)."""
    if setup.timeline[0]:
        raise ConfigError("sim.durations=timeline replays one pipeline's recorded run; with replicas.count > 1 use "
                          "sim.durations=flops or fixed")
    layout = Layout(setup.sched.n_ranks, cfg.replicas.count)
    S, mean = layout.pipeline_ranks, {}
    link_seed, conditions = cfg.seed, setup.links[0].conditions
    links = ReplicaLinks(setup.topo, layout, lambda topo, r: LinkModel(topo, r, seed=link_seed, conditions=conditions))
    players = []
    for j in range(layout.replicas):  # each replica's compute on its own nodes' hardware
        table = StageSeconds(_stage_time(cfg, setup.sched, setup.flops, setup.profiles[j * S:(j + 1) * S], mean))
        players.append(Player(setup.prog, lambda r, a, table=table: table[a[:2]], nbytes,
                              links.pipeline[j] if setup.topo.emulate else None))
    partition = list(cfg.pipeline.partition) if cfg.pipeline.partition else None
    method = build_sync(plain(cfg.replicas.sync))
    parts = rank_parts(cfg.model, setup.sched, cfg.seed, cfg.boundary, partition)
    return play_replicated(players, links, lambda step: [method.exchange(q, step) for q in parts], cfg.sim.steps,
                           measured, record)



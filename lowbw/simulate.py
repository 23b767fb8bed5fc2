"""lowbw-simulate: predict a pipeline's step time at scales no one here owns -- no tensors, no processes.

    lowbw-simulate                                           # GPT 1.3B, 64 stages x 128 microbatches, H100s, global net
    lowbw-simulate model=gpt_1b net=global schedule=1f1b pipeline.stages=64 pipeline.microbatches=128 hardware=h100
    lowbw-simulate schedule=zb_h1 net=home compress/fwd=int8 compress/bwd=int8 hardware=rtx4090
    lowbw-simulate -m schedule=gpipe,1f1b,zb_h1 net=datacenter,transatlantic,global   # a sweep

The same pieces a real run uses, without the tensors: the schedule comes from the registered
generators (``lowbw.pipeline.schedules.build_schedule``, validated), each step is played by
:class:`lowbw.pipeline.player.Player` with one ``LinkModel`` per rank (uplink queues, latency, downlink,
jitter, the packet-loss ceiling, carried from step to step as in a run), compute durations are FLOPs
(closed form, or ``torch.utils.flop_counter`` on the real module shapes on the meta device) divided by
the hardware profile's ``peak_flops * mfu``, and message sizes are the activation shape times the wire
dtype divided by the codec's ``estimate_ratio``. Output: summary.json in the Hydra run folder (step
time, tokens/s, bubble fraction, bytes per token, bytes per link and step, ...), plus timeline.png and
trace.json of a few steps.

Steady state: when nothing varies between steps (durations from FLOPs or fixed, no jitter), the steps
are played until one repeats the previous one shifted in time; the rest are extrapolated, and the
summary says how many were played (``steps_played``) and extrapolated (``steps_extrapolated``).
:func:`_repeats` proves why the extrapolated steps are the ones a full play would give.

Averages and energy cover the measured steps: ``sim.warmup_steps`` leading steps are left out (all
steps when there are no more than that). Energy is J/token over that window: busy and idle power of
every rank over the measured steps' span, plus the network energy of their bytes -- always modelled.

``sim.durations=timeline sim.timeline=RUN/timeline.jsonl`` replays the compute durations a run
recorded (per step and action where the step exists, else the mean per stage and kind), for
checking the simulator against execution.

More stages than blocks (e.g. 64 stages of a 24-block model): the simulator cuts blocks finer,
giving stage s the FLOPs of blocks [s L/P, (s+1) L/P) -- a partition lowbw-train cannot run (it
cuts between whole blocks), stated in the summary as ``fractional_partition: true``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import hydra
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lowbw.compress import build_codec
from lowbw.boundary import TOKEN_ID_BYTES, BoundaryMethod, build_method
from lowbw.config import (BoundaryConfig, CompressConfig, FaultsConfig, ModelConfig, NetConfig, PipelineConfig,
                          ReplicasConfig, ScheduleConfig, plain, register_resolvers)
from lowbw.energy import account, make_network_model
from lowbw.energy.profiles import HardwareProfile, profiles_for_ranks
from lowbw.errors import ConfigError, ScheduleError
from lowbw.limits import check_simulation
from lowbw.metrics.gantt import chrome_trace, plot_gantt, ranks_note, run_title, select_ranks
from lowbw.metrics.recorder import atomic_write_json
from lowbw.metrics.timeline import Timeline
from lowbw.models.flops import n_params, stage_flops
from lowbw.net.conditions import conditions_from_config
from lowbw.net.link import LinkModel
from lowbw.net.topology import Topology, link_key
from lowbw.pipeline.actions import Action, Kind, Schedule
from lowbw.pipeline.durations import action_seconds
from lowbw.pipeline.player import Player, Program, compile_schedule
from lowbw.pipeline.stepping import Steps, play_steps
from lowbw.pipeline.schedules import build_schedule
from lowbw.replicas import Layout, build_sync
from lowbw.replicas.charge import rank_parts
from lowbw.replicas.simulated import ReplicaLinks, play_replicated
from lowbw.validation import check_arch


@dataclass
class SimTrainConfig:
    batch_size: int = 128  # sequences per optimizer step (all microbatches); must be divisible by microbatches


@dataclass
class SimConfig:
    steps: int = 10  # optimizer steps simulated (link queues carry over between steps, as in a run)
    warmup_steps: int = 1  # leading steps left out of the averages and the energy (as train.warmup_steps)
    durations: str = "flops"  # flops: FLOPs / (hardware peak x mfu) | fixed: forward_s, backward_s | timeline
    flops: str = "formula"  # formula: closed form (checked against flop_counter in the tests) | counter: flop_counter on meta modules
    forward_s: float = 1.0  # durations=fixed: s per forward of one microbatch on one stage
    backward_s: float = 2.0  # durations=fixed: s per full backward (I and W take half each)
    timeline: Optional[str] = None  # durations=timeline: a run's timeline.jsonl
    activation_dtype: str = "bfloat16"  # dtype of activations and gradients before the codec (lowbw-train: float32)
    picture_steps: int = 2  # steps after warm-up drawn in timeline.png / trace.json; 0 = no pictures
    picture_ranks: int = 32  # ranks drawn in timeline.png (the first ones); 0 = no PNG; trace.json has all
    extrapolate: bool = True  # when a step repeats the previous one, extrapolate the rest; false = play every step


@dataclass
class SimulateConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    replicas: ReplicasConfig = field(default_factory=ReplicasConfig)  # copies of the pipeline (docs/replicas.md)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    net: NetConfig = field(default_factory=NetConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    boundary: BoundaryConfig = field(default_factory=BoundaryConfig)
    hardware: Any = field(default_factory=lambda: {"name": "h100"})  # configs/hardware/<name>.yaml, per_rank allowed
    energy: Any = field(default_factory=lambda: {"network": "intensity", "meter": "none"})  # configs/energy
    train: SimTrainConfig = field(default_factory=SimTrainConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    seed: int = 1337  # seeds link jitter, as in lowbw-train
    out_dir: Optional[str] = None  # where summary.json goes; null = Hydra's run folder


def register_simulate_config() -> None:
    ConfigStore.instance().store(name="simulate_schema", node=SimulateConfig)
    register_resolvers()


def _check(cfg: Any) -> None:
    """The settings a simulation needs, each error naming its setting: ranges and size budgets first
    (lowbw.limits), before any work."""
    check_simulation(cfg)
    make_network_model(cfg.energy)  # an energy setting that cannot work is refused here, not after playing
    pipe, sim, B = cfg.pipeline, cfg.sim, cfg.train.batch_size
    for name, v in (("pipeline.stages", pipe.stages), ("pipeline.microbatches", pipe.microbatches),
                    ("train.batch_size", B), ("sim.steps", sim.steps)):
        if v is None or v < 1:
            raise ConfigError(f"{name}={v} must be a positive integer")
    if B % pipe.microbatches:
        raise ConfigError(f"train.batch_size={B} is not divisible by pipeline.microbatches={pipe.microbatches}")
    if sim.durations not in ("flops", "fixed", "timeline"):
        raise ConfigError(f"sim.durations={sim.durations!r}: use flops, fixed or timeline")
    if sim.durations == "timeline" and not sim.timeline:
        raise ConfigError("sim.durations=timeline needs sim.timeline=<path of a run's timeline.jsonl>")
    if sim.flops not in ("formula", "counter"):
        raise ConfigError(f"sim.flops={sim.flops!r}: use formula or counter")
    check_arch(cfg.model)
    if build_method(cfg.boundary, cfg.model, cfg.seed).name != "none" and sim.flops == "counter":
        raise ConfigError(f"sim.flops=counter counts the dense model's modules; with boundary={cfg.boundary.name} "
                          "use sim.flops=formula (its closed form is checked against flop_counter in the tests)")
    if getattr(cfg.net, "backend", "emulated") != "emulated":
        raise ConfigError(f"net.backend={cfg.net.backend}: lowbw-simulate plays lowbw's link model; kernel-shaped "
                          "links are for lowbw-train (docs/networks.md, \"Real links\")")
    if cfg.schedule.name == "pipedream_2bw":
        raise ConfigError("schedule=pipedream_2bw: lowbw-simulate does not model asynchronous schedules (its steps "
                          "overlap); simulate 1f1b for the same steady state, or run lowbw-train")
    build_sync(plain(cfg.replicas.sync))  # a method, parameter or codec that does not exist: its ConfigError


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


class _StageSeconds(dict):
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


def bubble_formula(name: str, p: int, m: int, v: int = 1) -> Optional[float]:
    """The published idle fraction with equal stage times (T_F = T_B = T_W for ZB-H1)."""
    if name in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if name == "interleaved_1f1b":
        return (p - 1) / (v * m + p - 1)
    if name == "zb_h1" and m >= p:
        return (p - 1) / (3 * m + p - 1)
    return None


# ---- the summary ---------------------------------------------------------------------------------


@dataclass
class _Setup:
    """What a simulation is made of, before any step is played."""

    sched: Schedule
    prog: Program
    flops: list  # (forward, backward) FLOPs of one microbatch per stage
    fractional: bool  # stages cut finer than whole blocks
    profiles: list[HardwareProfile]
    table: _StageSeconds  # s per (stage, kind)
    timeline: tuple[dict, dict]  # (exact durations, optimizer durations) of a recorded run, else empty
    msg_bytes: dict[Kind, int]
    ratio: dict[str, float]
    topo: Topology
    links: dict[int, LinkModel]  # one per rank, also when the net is not emulated (for link busy fractions)
    param_delta: int  # parameters the boundary method adds to the dense model (negative: removes)
    boundary: str  # the boundary method and its size, in words


def _traffic(setup: _Setup, measured: list[dict], step_time: float) -> dict:
    """Bytes and messages of the last measured step, per link, and each link's busy share of a step."""
    per_link = measured[-1]["link_bytes"]
    busy = {k: setup.links[k[0]].transmit_seconds(*k, n) / step_time if step_time > 0 else 0.0
            for k, n in sorted(per_link.items())}
    return {
        "bytes_per_step": measured[-1]["bytes_sent"],
        "bytes_per_link_per_step": {link_key(*k): n for k, n in sorted(per_link.items())},
        "link_busy_fraction": {link_key(*k): f for k, f in busy.items()},
        "messages_per_step": measured[-1]["messages"],
        "message_bytes": {"fwd": setup.msg_bytes[Kind.SEND_F], "bwd": setup.msg_bytes[Kind.SEND_B]},
    }


def _stage_seconds(table: dict, n_stages: int) -> list[dict]:
    """Forward and full-backward seconds per stage (a split backward: I + W)."""
    split = {s: (table.get((s, Kind.BACKWARD_INPUT)) or 0.0) + (table.get((s, Kind.BACKWARD_WEIGHT)) or 0.0)
             for s in range(n_stages)}
    return [{"forward": table.get((s, Kind.FORWARD)), "backward": table.get((s, Kind.FULL_BACKWARD), split[s])}
            for s in range(n_stages)]


def _summary(cfg: Any, setup: _Setup, steps: Steps) -> dict:
    model, sched, p, m = cfg.model, setup.sched, cfg.pipeline.stages, cfg.pipeline.microbatches
    rows = steps.rows
    measured = rows[cfg.sim.warmup_steps:] if len(rows) > cfg.sim.warmup_steps else rows
    step_time = sum(r["step_time_s"] for r in measured) / len(measured)
    replicas = cfg.replicas.count
    tokens = cfg.train.batch_size * model.block_size * replicas  # every replica on a batch of its own
    v = sched.n_stages // p
    summary = {
        "status": "completed", "kind": "simulation", "schedule": sched.name, "net": cfg.net.name,
        "model": model.name, "hardware": sorted({pr.name for pr in setup.profiles}),
        "stages": p, "virtual_stages": v, "n_stages": sched.n_stages, "microbatches": m,
        "microbatch_size": cfg.train.batch_size // m,
        "steps": cfg.sim.steps, "steps_played": steps.played, "steps_extrapolated": len(rows) - steps.played,
        "measured_steps": len(measured), "tokens_per_step": tokens,
        "step_time_s": step_time, "tokens_per_s": tokens / step_time if step_time > 0 else None,
        "bubble_fraction": sum(r["bubble_fraction"] for r in measured) / len(measured),
        "bubble_formula": bubble_formula(sched.name, p, m, v),
        # over the measured steps (DiLoCo's replicas send every H steps only)
        "bytes_per_token": sum(r["bytes_sent"] for r in measured) / len(measured) / tokens,
        "replicas": replicas, "sync": plain(cfg.replicas.sync) if replicas > 1 else None,
        "sync_bytes_per_token": sum(n for r in measured for (a, b), n in r["link_bytes"].items()
                                    if a % p == b % p) / len(measured) / tokens,  # between a stage's replicas
        **_traffic(setup, measured, step_time),
        "codec_ratio": setup.ratio, "activation_dtype": cfg.sim.activation_dtype,
        "durations": cfg.sim.durations, "flops_source": cfg.sim.flops,
        "stage_flops": [{"forward": f, "backward": b} for f, b in setup.flops],
        "stage_seconds": _stage_seconds(setup.table, sched.n_stages),
        "fractional_partition": setup.fractional, "model_params": n_params(model) + setup.param_delta,
        "model_flops_per_step": m * sum(f + b for f, b in setup.flops),
        "per_step": [{k: r[k] for k in ("step", "step_time_s", "bubble_fraction", "bytes_sent")} for r in rows],
        "net_description": setup.topo.describe(),
    }
    if cfg.boundary.name != "none":  # (left out with none: the summaries of dense runs stay as they were)
        summary["boundary"] = {"name": cfg.boundary.name, "what": setup.boundary,
                               "params_delta": setup.param_delta}
    summary["energy"] = _energy(cfg, steps, measured, tokens)
    return summary


def _energy(cfg: Any, steps: Steps, measured: list[dict], tokens: int) -> dict:
    """J/token over the measured steps (warm-up left out), as lowbw-train accounts a run; always modelled."""
    link_bytes: dict[tuple[int, int], int] = {}
    for row in measured:
        for k, n in row["link_bytes"].items():
            link_bytes[k] = link_bytes.get(k, 0) + n
    span = sum(r["step_time_s"] for r in measured)
    return account([min(b, span) for b in steps.busy_measured], span, cfg.hardware, cfg.energy,
                   tokens=tokens * len(measured), link_bytes=link_bytes).to_dict()


def _play(cfg: Any, setup: _Setup, record: frozenset[int]) -> Steps:
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


def _play_replicas(cfg: Any, setup: _Setup, nbytes: Callable[[Action], int], measured: list[bool],
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
        table = _StageSeconds(_stage_time(cfg, setup.sched, setup.flops, setup.profiles[j * S:(j + 1) * S], mean))
        players.append(Player(setup.prog, lambda r, a, table=table: table[a[:2]], nbytes,
                              links.pipeline[j] if setup.topo.emulate else None))
    partition = list(cfg.pipeline.partition) if cfg.pipeline.partition else None
    method = build_sync(plain(cfg.replicas.sync))
    parts = rank_parts(cfg.model, setup.sched, cfg.seed, cfg.boundary, partition)
    return play_replicated(players, links, lambda step: [method.exchange(q, step) for q in parts], cfg.sim.steps,
                           measured, record)


# ---- the simulation ------------------------------------------------------------------------------


def _setup(cfg: Any) -> _Setup:
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
    table = _StageSeconds(_stage_time(cfg, sched, flops, profiles, mean))
    msg_bytes, ratio = _message_bytes(cfg, (mb, model.block_size), method)
    topo, links = _links(cfg, world)
    return _Setup(sched, compile_schedule(sched), flops, fractional, profiles, table, (exact, opt), msg_bytes, ratio,
                  topo, links, method.param_delta(sched.n_stages), method.describe())


@contextlib.contextmanager
def _collector_paused():
    """Pause Python's cyclic garbage collector while a simulation builds its ~10^5-10^6 small tuples.

    Why: each burst of allocations triggers a collection, and the full ones walk the whole heap (torch's
    included) -- at 64 stages x 256 microbatches that was most of the CPU time (scripts/bench_simulator.py).
    The tuples hold no reference cycles, so reference counting frees them as before; anything cyclic
    made meanwhile is collected once the collector is back on."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def simulate(cfg: Any, keep_timeline: bool = False) -> dict:
    """Play ``cfg.sim.steps`` steps of the configured pipeline on the link model; return the summary.

    Averages and energy (J/token) are over the measured steps: the ``sim.warmup_steps`` leading steps are
    left out. ``keep_timeline``: also return the pictured steps' Timeline under the key "_timeline".
    """
    cpu0 = time.process_time()
    _check(cfg)
    with _collector_paused():  # and back on once the simulation's tuples are freed (on return)
        summary = _simulate(cfg, keep_timeline)
    summary["sim_cpu_s"] = time.process_time() - cpu0
    return summary



def _simulate(cfg: Any, keep_timeline: bool) -> dict:
    setup = _setup(cfg)
    sim = cfg.sim
    first_pic = min(sim.warmup_steps, sim.steps - 1)
    steps = _play(cfg, setup, frozenset(range(first_pic, first_pic + max(sim.picture_steps, 0))))
    summary = _summary(cfg, setup, steps)
    if keep_timeline:
        summary["_timeline"] = Timeline("virtual", cfg.pipeline.stages * cfg.replicas.count, steps.events)
    return summary


def format_simulation(s: dict) -> str:
    bf = s["bubble_formula"]
    extrapolated = s.get("steps_extrapolated", 0)
    lines = [
        f"lowbw simulation: model {s['model']}, schedule {s['schedule']}"
        + (f" (v={s['virtual_stages']})" if s["virtual_stages"] > 1 else "")
        + f", {s['stages']} stages x {s['microbatches']} microbatches of {s['microbatch_size']}"
        + (f", x {s['replicas']} replicas ({s['sync']['name']})" if s.get("replicas", 1) > 1 else "") + ", "
        f"net {s['net']}, hardware {','.join(s['hardware'])}",
        f"  step time    {s['step_time_s']:.4f} s   ({s['measured_steps']} of {s['steps']} steps averaged)",
        f"  steps        {s['steps']}: {s.get('steps_played', s['steps'])} played, {extrapolated} extrapolated"
        + (" (a step repeated the one before it, shifted in time: the rest repeat it too)" if extrapolated else ""),
        f"  throughput   {s['tokens_per_s']:,.1f} tokens/s",
        f"  bubble       {s['bubble_fraction']:.3f}" + (f"   (equal-times formula {bf:.3f})" if bf is not None else ""),
        f"  traffic      {s['bytes_per_token']:,.1f} bytes per token"
        + (f" (of which {s['sync_bytes_per_token']:,.1f} between replicas)" if s.get("replicas", 1) > 1 else "")
        + f", {s['message_bytes']['fwd']:,} B per forward message, {s['messages_per_step']} messages per step",
        f"  cpu          {s['sim_cpu_s']:.2f} s to simulate",
    ]
    if "boundary" in s:
        b = s["boundary"]
        lines.insert(-1, f"  boundary     {b['what']}; {s['model_params']:,} parameters ({b['params_delta']:+,} "
                         "against the dense model's)")
    e = s.get("energy")
    if e:
        lines.insert(-1, f"  energy       {e['j_per_token']:.4g} J/token (modelled, measured steps): compute "
                         f"{e['compute_j']:.4g} J, idle {e['idle_j']:.4g} J, network {e['network_j']:.4g} J "
                         f"over {e['span_s']:.4g} s")
    if s["fractional_partition"]:
        lines.append("  note         more stages than blocks: blocks cut finer than lowbw-train can (fractional_partition)")
    return "\n".join(lines)


def write_outputs(summary: dict, out: Path, picture_ranks: int = 32) -> list[str]:
    """summary.json, trace.json (every rank) and timeline.png (the first ``picture_ranks`` ranks) in ``out``.

    Returns the console lines saying which files were written and, when the picture was cut to its first
    ranks or left out, so."""
    if picture_ranks < 0:
        raise ConfigError(f"sim.picture_ranks={picture_ranks} must be >= 0 (ranks drawn in timeline.png; 0 = none)")
    out.mkdir(parents=True, exist_ok=True)
    tl = summary.pop("_timeline", None)
    summary["run_dir"] = str(out)
    atomic_write_json(out / "summary.json", summary)
    files, notes = ["summary.json"], []
    if tl is not None and tl.events:
        title = "simulated: " + run_title({**summary, "world_size": summary["stages"] * summary.get("replicas", 1)},
                                          "virtual")
        chrome_trace(tl, out / "trace.json", title)
        files.append("trace.json")
        (out / "timeline.png").unlink(missing_ok=True)  # never leave an older run's picture behind
        if picture_ranks > 0:
            plot_gantt(select_ranks(tl, picture_ranks), out / "timeline.png", title, of_ranks=tl.n_ranks)
            files.append("timeline.png")
            cut = ranks_note(min(picture_ranks, tl.n_ranks), tl.n_ranks)
            if cut:
                notes.append(f"  picture      timeline.png shows {cut} (sim.picture_ranks={picture_ranks}); "
                             "trace.json has every rank")
        else:
            notes.append("  picture      no timeline.png (sim.picture_ranks=0); trace.json has every rank")
    return [f"  outputs      {out}  ({', '.join(files)})"] + notes


register_simulate_config()


@hydra.main(config_path="pkg://lowbw_configs", config_name="simulate", version_base="1.3")
def main(cfg) -> Optional[dict]:
    out = Path(cfg.out_dir) if cfg.out_dir else Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = simulate(cfg, keep_timeline=cfg.sim.picture_steps > 0)
        lines = write_outputs(summary, out, cfg.sim.picture_ranks)
    except (ConfigError, ScheduleError) as e:
        print(f"lowbw-simulate: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a full disk or a folder that cannot be written: each file is whole or absent
        print(f"lowbw-simulate: could not write the outputs: {e}", file=sys.stderr)
        sys.exit(1)
    print(format_simulation(summary))
    print("\n".join(lines))
    return summary


def compose(overrides: Optional[list[str]] = None):
    """The config ``lowbw-simulate <overrides>`` would run, composed without starting Hydra's app."""
    with initialize_config_module("lowbw_configs", version_base="1.3"):
        return hydra_compose("simulate", overrides=list(overrides or []))


if __name__ == "__main__":
    main()

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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig

from lowbw.boundary import build_method
from lowbw.config import (BoundaryConfig, CompressConfig, ModelConfig, NetConfig, PipelineConfig,
                          ReplicasConfig, ScheduleConfig, plain, register_resolvers)
from lowbw.energy import account, make_network_model
from lowbw.errors import ConfigError, ScheduleError
from lowbw.limits import check_simulation
from lowbw.metrics.gantt import chrome_trace, plot_gantt, ranks_note, run_title, select_ranks
from lowbw.metrics.recorder import atomic_write_json
from lowbw.metrics.timeline import Timeline
from lowbw.models.flops import n_params
from lowbw.net.topology import link_key
from lowbw.pipeline.actions import Kind
from lowbw.pipeline.stepping import Steps
from lowbw.replicas import build_sync
from lowbw.simulated_pipeline import Setup, play, setup_of
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


def _traffic(setup: Setup, measured: list[dict], step_time: float) -> dict:
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


def _summary(cfg: Any, setup: Setup, steps: Steps) -> dict:
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


# ---- the simulation ------------------------------------------------------------------------------


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
    setup = setup_of(cfg)
    sim = cfg.sim
    first_pic = min(sim.warmup_steps, sim.steps - 1)
    steps = play(cfg, setup, frozenset(range(first_pic, first_pic + max(sim.picture_steps, 0))))
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

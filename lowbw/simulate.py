"""lowbw-simulate: predict a pipeline's step time at scales no one here owns -- no tensors, no processes.

    lowbw-simulate                                           # GPT 1.3B, 64 stages x 128 microbatches, H100s, global net
    lowbw-simulate model=gpt_1b net=global schedule=1f1b pipeline.stages=64 pipeline.microbatches=128 hardware=h100
    lowbw-simulate schedule=zb_h1 net=home compress/fwd=int8 compress/bwd=int8 hardware=rtx4090
    lowbw-simulate -m schedule=gpipe,1f1b,zb_h1 net=datacenter,transatlantic,global   # a sweep

The same pieces a real run uses, without the tensors: the schedule comes from the registered
generators (``lowbw.pipeline.schedules.build_schedule``, validated), each step is played by
``lowbw.pipeline.validate.play`` with one ``LinkModel`` per rank (uplink queues, latency, downlink,
jitter carried from step to step as in a run), compute durations are FLOPs (counted by
``torch.utils.flop_counter`` on the real module shapes on the meta device: no memory) divided by
the hardware profile's ``peak_flops * mfu``, and message sizes are the activation shape times the
wire dtype divided by the codec's ``estimate_ratio``. Output: summary.json in the Hydra run folder
(step time, tokens/s, bubble fraction, bytes per token, bytes per link and step, ...), plus
timeline.png and trace.json of a few steps.

``sim.durations=timeline sim.timeline=RUN/timeline.jsonl`` replays the compute durations a run
recorded (per step and action where the step exists, else the mean per stage and kind), for
checking the simulator against execution.

More stages than blocks (e.g. 64 stages of a 24-block model): the simulator cuts blocks finer,
giving stage s the FLOPs of blocks [s L/P, (s+1) L/P) -- a partition lowbw-train cannot run (it
cuts between whole blocks), stated in the summary as ``fractional_partition: true``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lowbw.config import CompressConfig, ModelConfig, NetConfig, PipelineConfig, ScheduleConfig
from lowbw.errors import ConfigError, ScheduleError
from lowbw.metrics.timeline import Event, Timeline
from lowbw.models.flops import n_params, stage_flops
from lowbw.pipeline.durations import action_seconds


@dataclass
class SimTrainConfig:
    batch_size: int = 128  # sequences per optimizer step (all microbatches); must be divisible by microbatches


@dataclass
class SimConfig:
    steps: int = 10  # optimizer steps played (link queues carry over between steps, as in a run)
    warmup_steps: int = 1  # leading steps left out of the averages (as train.warmup_steps)
    durations: str = "flops"  # flops: FLOPs / (hardware peak x mfu) | fixed: forward_s, backward_s | timeline
    flops: str = "formula"  # formula: closed form (checked against flop_counter in the tests) | counter: flop_counter on meta modules
    forward_s: float = 1.0  # durations=fixed: s per forward of one microbatch on one stage
    backward_s: float = 2.0  # durations=fixed: s per full backward (I and W take half each)
    timeline: Optional[str] = None  # durations=timeline: a run's timeline.jsonl
    activation_dtype: str = "bfloat16"  # dtype of activations and gradients before the codec (lowbw-train: float32)
    picture_steps: int = 2  # steps after warm-up drawn in timeline.png / trace.json; 0 = no pictures
    picture_ranks: int = 32  # ranks drawn in timeline.png (the first ones); 0 = no PNG; trace.json has all


@dataclass
class SimulateConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    net: NetConfig = field(default_factory=NetConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    hardware: Any = field(default_factory=lambda: {"name": "h100"})  # configs/hardware/<name>.yaml, per_rank allowed
    energy: Any = field(default_factory=lambda: {"network": "intensity", "meter": "none"})  # configs/energy
    train: SimTrainConfig = field(default_factory=SimTrainConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    seed: int = 1337  # seeds link jitter, as in lowbw-train
    out_dir: Optional[str] = None  # where summary.json goes; null = Hydra's run folder


def register_simulate_config() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="simulate_schema", node=SimulateConfig)


# ---- durations -----------------------------------------------------------------------------------

_KIND_OF_EVENT = {"forward": "F", "backward": "B", "backward_input": "I", "backward_weight": "W"}


def _durations_from_timeline(path: str, sched: Any) -> tuple[dict, dict, dict]:
    """(exact[(step, rank, label)], mean[(stage, kind)], optimizer[(step, rank)]) from a timeline.jsonl."""
    from lowbw.pipeline.actions import Action, Kind

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


# ---- the simulation ------------------------------------------------------------------------------


def _dtype(name: str):
    import torch

    try:
        dt = getattr(torch, name)
        assert isinstance(dt, torch.dtype)
        return dt
    except (AttributeError, AssertionError):
        raise ConfigError(f"sim.activation_dtype={name!r} is not a torch dtype (e.g. bfloat16, float16, float32)") from None


def bubble_formula(name: str, p: int, m: int, v: int = 1) -> Optional[float]:
    """The published idle fraction with equal stage times (T_F = T_B = T_W for ZB-H1)."""
    if name in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if name == "interleaved_1f1b":
        return (p - 1) / (v * m + p - 1)
    if name == "zb_h1" and m >= p:
        return (p - 1) / (3 * m + p - 1)
    return None


def simulate(cfg: Any, keep_timeline: bool = False) -> dict:
    """Play ``cfg.sim.steps`` steps of the configured pipeline on the link model; return the summary.

    ``keep_timeline``: also return the pictured steps' Timeline under the key "_timeline".
    """
    from lowbw.compress import build_codec
    from lowbw.config import plain as _plain
    from lowbw.energy.profiles import profiles_for_ranks
    from lowbw.net.link import LinkModel
    from lowbw.net.topology import Topology
    from lowbw.pipeline.actions import Kind
    from lowbw.pipeline.schedules import build_schedule
    from lowbw.pipeline.fastplay import Program, play_fast

    cpu0 = time.process_time()
    model, pipe, sim = cfg.model, cfg.pipeline, cfg.sim
    p, m, B, T = pipe.stages, pipe.microbatches, cfg.train.batch_size, model.block_size
    for name, v in (("pipeline.stages", p), ("pipeline.microbatches", m), ("train.batch_size", B),
                    ("sim.steps", sim.steps)):
        if v is None or v < 1:
            raise ConfigError(f"{name}={v} must be a positive integer")
    if B % m:
        raise ConfigError(f"train.batch_size={B} is not divisible by pipeline.microbatches={m}")
    if sim.durations not in ("flops", "fixed", "timeline"):
        raise ConfigError(f"sim.durations={sim.durations!r}: use flops, fixed or timeline")
    mb = B // m
    sched = build_schedule(cfg.schedule, p, m)
    S = sched.n_stages
    v = S // p

    # compute durations per (rank, stage, kind)
    if sim.flops not in ("formula", "counter"):
        raise ConfigError(f"sim.flops={sim.flops!r}: use formula or counter")
    flops, fractional = stage_flops(model, S, mb, _plain(pipe.partition), counter=sim.flops == "counter")
    profiles = profiles_for_ranks(cfg.hardware, p)
    exact: dict = {}
    opt: dict = {}
    if sim.durations == "flops":
        def stage_time(s: int, kind: Kind) -> float:
            rate = profiles[sched.stage_to_rank[s]].effective_flops
            return action_seconds(kind, flops[s][0] / rate, flops[s][1] / rate)
    elif sim.durations == "fixed":
        def stage_time(s: int, kind: Kind) -> float:
            return action_seconds(kind, sim.forward_s, sim.backward_s)
    else:
        if not sim.timeline:
            raise ConfigError("sim.durations=timeline needs sim.timeline=<path of a run's timeline.jsonl>")
        exact, mean, opt = _durations_from_timeline(sim.timeline, sched)

        def stage_time(s: int, kind: Kind) -> float:
            if (s, kind) in mean:
                return mean[(s, kind)]
            if kind in (Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT) and (s, Kind.FULL_BACKWARD) in mean:
                return mean[(s, Kind.FULL_BACKWARD)] / 2
            if kind == Kind.FULL_BACKWARD and (s, Kind.BACKWARD_INPUT) in mean:
                return mean[(s, Kind.BACKWARD_INPUT)] + mean.get((s, Kind.BACKWARD_WEIGHT), 0.0)
            raise ConfigError(f"sim.timeline={sim.timeline!r} records no {kind.name} of stage {s}")

    kinds = (Kind.FORWARD, Kind.FULL_BACKWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT)
    table = {(s, k): stage_time(s, k) for s in range(S) for k in kinds
             if any(a.stage == s and a.kind == k for a in sched.actions[sched.stage_to_rank[s]])}

    # message sizes
    dtype = _dtype(sim.activation_dtype)
    shape = (mb, T, model.n_embd)
    raw = math.prod(shape) * dtype.itemsize
    ratio = {}
    for direction in ("fwd", "bwd"):
        spec = _plain(cfg.compress[direction]) if hasattr(cfg.compress, "__getitem__") else getattr(cfg.compress, direction)
        try:
            ratio[direction] = float(build_codec(spec).estimate_ratio(shape, dtype))
        except ConfigError as e:
            raise ConfigError(f"compress.{direction}: {e}") from None
    msg_bytes = {Kind.SEND_F: int(round(raw / ratio["fwd"])), Kind.SEND_B: int(round(raw / ratio["bwd"]))}

    topo = Topology.from_config(cfg.net, p, seed=cfg.seed)
    links = {r: LinkModel(topo, r, seed=cfg.seed) for r in range(p)} if topo.emulate else None

    first_pic = min(sim.warmup_steps, sim.steps - 1)
    keep = set(range(first_pic, first_pic + sim.picture_steps)) if sim.picture_steps > 0 else set()
    prog = Program(sched)
    size = lambda a: msg_bytes[a.kind]  # noqa: E731
    start = {r: 0.0 for r in range(p)}
    t_prev = 0.0
    rows = []
    busy_total = [0.0] * p  # s per rank over the measured steps
    events: list[Event] = []
    for step in range(sim.steps):
        if exact:
            def duration(r, a, step=step):
                return exact.get((step, r, str(a)), table[(a.stage, a.kind)])
        else:
            def duration(r, a):
                return table[(a.stage, a.kind)]
        res = play_fast(prog, duration, size, links, start, step, record=step in keep)
        events += res.events
        end, busy = list(res.end), list(res.busy)
        for r in range(p):  # the optimizer step ends the rank's step: 0 s under planned durations (as lowbw-train)
            o = opt.get((step, r), 0.0)
            if o and step in keep:
                events.append(Event(r, "optimizer", end[r], end[r] + o, step, "optimizer"))
            end[r] += o
            busy[r] += o
            start[r] = end[r]
        t_end = max(end)
        span = t_end - t_prev
        t_prev = t_end
        if step >= sim.warmup_steps or sim.steps <= sim.warmup_steps:
            for r in range(p):
                busy_total[r] += busy[r]
        rows.append({
            "step": step, "step_time_s": span,
            "bubble_fraction": 1.0 - sum(busy) / (p * span) if span > 0 else 0.0,
            "bytes_sent": sum(res.link_bytes.values()), "messages": res.messages,
            "bytes_per_link": {f"{a}->{b}": n for (a, b), n in sorted(res.link_bytes.items())},
        })
    measured = rows[sim.warmup_steps:] if len(rows) > sim.warmup_steps else rows
    step_time = sum(r["step_time_s"] for r in measured) / len(measured)
    tokens = B * T
    per_link = measured[-1]["bytes_per_link"]
    link_caps = {k: topo.link(*map(int, k.split("->"))).bandwidth_bps for k in per_link}
    summary = {
        "status": "completed",
        "kind": "simulation",
        "schedule": sched.name,
        "net": cfg.net.name,
        "model": model.name,
        "hardware": sorted({pr.name for pr in profiles}),
        "stages": p,
        "virtual_stages": v,
        "n_stages": S,
        "microbatches": m,
        "microbatch_size": mb,
        "steps": sim.steps,
        "measured_steps": len(measured),
        "tokens_per_step": tokens,
        "step_time_s": step_time,
        "tokens_per_s": tokens / step_time if step_time > 0 else None,
        "bubble_fraction": sum(r["bubble_fraction"] for r in measured) / len(measured),
        "bubble_formula": bubble_formula(sched.name, p, m, v),
        "bytes_per_step": measured[-1]["bytes_sent"],
        "bytes_per_token": measured[-1]["bytes_sent"] / tokens,
        "bytes_per_link_per_step": per_link,
        "link_busy_fraction": {k: (8 * n / link_caps[k]) / step_time if step_time > 0 and math.isfinite(link_caps[k])
                               else 0.0 for k, n in per_link.items()},
        "messages_per_step": measured[-1]["messages"],
        "message_bytes": {"fwd": msg_bytes[Kind.SEND_F], "bwd": msg_bytes[Kind.SEND_B]},
        "codec_ratio": ratio,
        "activation_dtype": sim.activation_dtype,
        "durations": sim.durations,
        "flops_source": sim.flops,
        "stage_flops": [{"forward": f, "backward": b} for f, b in flops],
        "stage_seconds": [{"forward": table.get((s, Kind.FORWARD)),
                           "backward": table.get((s, Kind.FULL_BACKWARD),
                                                 (table.get((s, Kind.BACKWARD_INPUT)) or 0.0)
                                                 + (table.get((s, Kind.BACKWARD_WEIGHT)) or 0.0))} for s in range(S)],
        "fractional_partition": fractional,
        "model_params": n_params(model),
        "model_flops_per_step": m * sum(f + b for f, b in flops),
        "per_step": [{k: r[k] for k in ("step", "step_time_s", "bubble_fraction", "bytes_sent")} for r in rows],
        "net_description": topo.describe(),
        "sim_cpu_s": time.process_time() - cpu0,
    }
    # Energy over the measured steps, as lowbw-train accounts a run (always modelled: nothing runs).
    from lowbw.energy import account

    link_bytes: dict[tuple[int, int], int] = {}
    for r in measured:
        for k, n in r["bytes_per_link"].items():
            a, b = map(int, k.split("->"))
            link_bytes[(a, b)] = link_bytes.get((a, b), 0) + n
    span = sum(r["step_time_s"] for r in measured)
    summary["energy"] = account([min(b, span) for b in busy_total], span, cfg.hardware, cfg.energy,
                                tokens=tokens * len(measured), link_bytes=link_bytes).to_dict()
    if keep_timeline:
        summary["_timeline"] = Timeline("virtual", p, events)
    return summary


def format_simulation(s: dict) -> str:
    bf = s["bubble_formula"]
    lines = [
        f"lowbw simulation: model {s['model']}, schedule {s['schedule']}"
        + (f" (v={s['virtual_stages']})" if s["virtual_stages"] > 1 else "")
        + f", {s['stages']} stages x {s['microbatches']} microbatches of {s['microbatch_size']}, "
        f"net {s['net']}, hardware {','.join(s['hardware'])}",
        f"  step time    {s['step_time_s']:.4f} s   ({s['measured_steps']} of {s['steps']} steps averaged)",
        f"  throughput   {s['tokens_per_s']:,.1f} tokens/s",
        f"  bubble       {s['bubble_fraction']:.3f}" + (f"   (equal-times formula {bf:.3f})" if bf is not None else ""),
        f"  traffic      {s['bytes_per_token']:,.1f} bytes per token, {s['message_bytes']['fwd']:,} B per forward "
        f"message, {s['messages_per_step']} messages per step",
        f"  cpu          {s['sim_cpu_s']:.2f} s to simulate",
    ]
    e = s.get("energy")
    if e:
        lines.insert(-1, f"  energy       {e['j_per_token']:.4g} J/token (modelled): compute {e['compute_j']:.4g} J, "
                         f"idle {e['idle_j']:.4g} J, network {e['network_j']:.4g} J over {e['span_s']:.4g} s")
    if s["fractional_partition"]:
        lines.append("  note         more stages than blocks: blocks cut finer than lowbw-train can (fractional_partition)")
    return "\n".join(lines)


def write_outputs(summary: dict, out: Path, picture_ranks: int = 32) -> list[str]:
    """summary.json, trace.json (every rank) and timeline.png (the first ``picture_ranks`` ranks) in ``out``.

    Returns the console lines saying which files were written and, when the picture was cut to its first
    ranks or left out, so."""
    from lowbw.metrics.gantt import chrome_trace, plot_gantt, ranks_note, run_title, select_ranks
    from lowbw.metrics.recorder import atomic_write_json

    if picture_ranks < 0:
        raise ConfigError(f"sim.picture_ranks={picture_ranks} must be >= 0 (ranks drawn in timeline.png; 0 = none)")
    out.mkdir(parents=True, exist_ok=True)
    tl = summary.pop("_timeline", None)
    summary["run_dir"] = str(out)
    atomic_write_json(out / "summary.json", summary)
    files, notes = ["summary.json"], []
    if tl is not None and tl.events:
        title = "simulated: " + run_title({**summary, "world_size": summary["stages"]}, "virtual")
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

try:
    import hydra

    @hydra.main(config_path="pkg://lowbw_configs", config_name="simulate", version_base="1.3")
    def main(cfg) -> Optional[dict]:
        from hydra.core.hydra_config import HydraConfig

        out = Path(cfg.out_dir) if cfg.out_dir else Path(HydraConfig.get().runtime.output_dir)
        try:
            summary = simulate(cfg, keep_timeline=cfg.sim.picture_steps > 0)
            lines = write_outputs(summary, out, cfg.sim.picture_ranks)
        except (ConfigError, ScheduleError) as e:
            print(f"lowbw-simulate: configuration error: {e}", file=sys.stderr)
            sys.exit(2)
        print(format_simulation(summary))
        print("\n".join(lines))
        return summary
except ImportError:  # pragma: no cover
    pass


def compose(overrides: Optional[list[str]] = None):
    """The config ``lowbw-simulate <overrides>`` would run, composed without starting Hydra's app."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("lowbw_configs", version_base="1.3"):
        return hydra_compose("simulate", overrides=list(overrides or []))


if __name__ == "__main__":
    main()

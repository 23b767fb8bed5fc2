"""Time and joules to a target loss: volunteers' RTX 4090s over home broadband against a datacenter of H100s.

    nice -n 5 python experiments/time_to_loss/study.py            # learning runs (resumable), timing, tables
    nice -n 5 python experiments/time_to_loss/study.py --tables   # timing and tables from the runs there are

Learning -- one lowbw-train run per method and seed: a tiny GPT (8 blocks, one per stage) in 8 processes
learns while its virtual clock keeps the regime of the reference cell (gpt_1b on 8 x rtx4090 over symmetric
100 Mbit/s home links, 1F1B). Its steps to each of TARGETS are read from its metrics.jsonl with the
function the run's own summary uses (lowbw.metrics.target.time_to_target); in its own cell its clock gives
the time and joules directly. Synchronous schedules compute the same gradients and the network changes no
arithmetic, so a method's steps to the target are the same in every cell: the learning runs are one per
method and seed, not one per cell.

Timing -- lowbw-simulate for every cell (method x schedule x bandwidth, and the baselines): the same target
model, stages, microbatches and codecs, so a cell's step time is what the regime run would show there
(tests/test_regime.py). A cell's time to the target = steps to it x the cell's step time; joules likewise
(the reference cell's learning runs check this against their own clocks).

Adding a method: one entry in METHODS, its codec overrides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from tables import table_lines  # experiments/time_to_loss/tables.py (the script's folder is on sys.path)

from lowbw.metrics.target import time_to_target
from lowbw.simulate import compose as sim_compose
from lowbw.simulate import simulate
from lowbw.train import compose, run

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
SIMS = HERE / "sims.json"

# method -> codec overrides (the same for the learning run and the simulator)
METHODS = {
    "none": ["compress/fwd=none", "compress/bwd=none"],
    "int8": ["compress/fwd=int8", "compress/bwd=int8"],
    "topk10": ["compress/fwd=topk", "compress.fwd.ratio=0.1", "compress/bwd=topk", "compress.bwd.ratio=0.1"],
    "powersgd4": ["compress/fwd=powersgd", "compress/bwd=powersgd"],  # rank 4, float32 factors
}
SEEDS = [1, 2]
SCHEDULES = ["gpipe", "1f1b", "zb_h1"]
BANDWIDTHS = [10, 100, 1000]  # Mbit/s, symmetric home links: the study's cells
FINE = [10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000]  # Mbit/s: where the crossovers lie
# validation losses, nats/byte. 2.7 was fixed before the runs (to lie within the uncompressed learner's 120 steps;
# the runs' own summaries use it); 2.75 was added after them, as the loss every method but top-k reached.
TARGETS = (2.7, 2.75)

PIPELINE = ["pipeline.stages=8", "pipeline.microbatches=8", "train.batch_size=16"]  # 8 microbatches of 2 sequences
REFERENCE = {"schedule": "1f1b", "mbps": 100}  # the learning runs' own regime cell
LEARNING = PIPELINE + [
    "model=tiny", "model.n_layer=8", "regime=gpt_1b", "hardware=rtx4090", "net=home",
    f"net.uplink_mbps={REFERENCE['mbps']}", f"net.downlink_mbps={REFERENCE['mbps']}", f"schedule={REFERENCE['schedule']}",
    "train.steps=120", "train.eval_interval=10", "train.eval_batches=2", f"train.target_loss={TARGETS[0]}", "progress=false",
]


def home(mbps: float) -> list[str]:
    return ["net=home", "hardware=rtx4090", f"net.uplink_mbps={mbps}", f"net.downlink_mbps={mbps}"]


# the baselines: the same model and pipeline in a datacenter, on H100s and on the volunteers' own RTX 4090s
BASELINES = {"datacenter_h100": ["net=datacenter", "hardware=h100"],
             "datacenter_rtx4090": ["net=datacenter", "hardware=rtx4090"]}


def learn() -> None:
    """The learning runs, one per method and seed (every method's first seed first); a completed run is kept."""
    for seed in SEEDS:
        for method, codecs in METHODS.items():
            out = RUNS / f"{method}_seed{seed}"
            done = out / "summary.json"
            if done.is_file() and json.loads(done.read_text()).get("status") == "completed":
                continue
            print(f"learning run {out.name}", flush=True)
            run(compose(LEARNING + codecs + [f"seed={seed}"]), out)


def steps_to_target(method: str, target: float) -> list[dict]:
    """Per seed: the learning run's target block and its own clock's figures."""
    out = []
    for seed in SEEDS:
        p = RUNS / f"{method}_seed{seed}" / "summary.json"
        if p.is_file():
            s = json.loads(p.read_text())
            if s.get("status") != "completed":
                continue
            rows = [json.loads(line) for line in (p.parent / "metrics.jsonl").read_text().splitlines() if line]
            out.append({"seed": seed, "target": time_to_target(rows, target), "step_time_s": s["step_time_s"],
                        "tokens": s["tokens"], "val_loss": s["val_loss"],
                        "curve": [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]})
    return out


def simulate_cell(overrides: list[str]) -> dict:
    """One cell's step time and energy per step by lowbw-simulate (kept in sims.json: the simulator is
    deterministic, so a cell is simulated once per checkout; delete the file after changing lowbw)."""
    args = ["model=gpt_1b", "sim.steps=6", "sim.picture_steps=0"] + PIPELINE + overrides
    key = " ".join(args)
    cache = json.loads(SIMS.read_text()) if SIMS.is_file() else {}
    if key not in cache:
        cache[key] = _simulate(args)
        SIMS.write_text(json.dumps(cache, indent=1))
    return cache[key]


def _simulate(args: list[str]) -> dict:
    s = simulate(sim_compose(args))
    e = s["energy"]
    return {"step_time_s": s["step_time_s"], "j_per_step": e["total_j"] / s["measured_steps"],
            "bubble": s["bubble_fraction"], "compute_j": e["compute_j"] / s["measured_steps"],
            "idle_j": e["idle_j"] / s["measured_steps"], "network_j": e["network_j"] / s["measured_steps"]}


def to_target(sim: dict, steps: list[float]) -> dict:
    """Time and joules to the target in a cell: steps (one per seed) x the cell's step time / joules per step."""
    t = [n * sim["step_time_s"] for n in steps]
    j = [n * sim["j_per_step"] for n in steps]
    return {"time_s": statistics.mean(t), "time_min_s": min(t), "time_max_s": max(t),
            "joules": statistics.mean(j), "joules_min": min(j), "joules_max": max(j), **sim}


def timing(target: float) -> dict:
    """Every cell's step time and energy per step, and the time and joules to the target from the learning runs."""
    learned = {m: steps_to_target(m, target) for m in METHODS}
    steps = {m: [r["target"]["first_crossing"]["step"] + 1 for r in rs if r["target"]["reached"]]
             for m, rs in learned.items()}
    result = {"target": target, "learning": learned, "steps": steps, "cells": [], "baselines": {}}
    none_steps = steps["none"]
    for name, over in BASELINES.items():
        for sched in SCHEDULES:
            sim = simulate_cell(over + METHODS["none"] + [f"schedule={sched}"])
            result["baselines"][f"{name}/{sched}"] = to_target(sim, none_steps) if none_steps else sim
    for method, codecs in METHODS.items():
        for sched in SCHEDULES:
            for mbps in FINE:
                sim = simulate_cell(home(mbps) + codecs + [f"schedule={sched}"])
                cell = {"method": method, "schedule": sched, "mbps": mbps,
                        "reached": len(steps[method]), "of": len(learned[method])}
                cell.update(to_target(sim, steps[method]) if steps[method] else sim)
                result["cells"].append(cell)
    return result


def check_reference(result: dict) -> list[str]:
    """The learning runs timed their own cell: their clock's time to the target against steps x simulated step."""
    lines = []
    for method, runs in result["learning"].items():
        cell = next(c for c in result["cells"] if c["method"] == method and c["schedule"] == REFERENCE["schedule"]
                    and c["mbps"] == REFERENCE["mbps"])
        for r in runs:
            if r["target"]["reached"]:
                own = r["target"]["first_crossing"]["time_s"]
                sim = (r["target"]["first_crossing"]["step"] + 1) * cell["step_time_s"]
                lines.append(f"| {method} | {r['seed']} | {r['target']['first_crossing']['step']} | {own:,.1f} | "
                             f"{sim:,.1f} | {100 * (own / sim - 1):+.2f}% |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tables", action="store_true", help="no new learning runs: timing and tables only")
    args = ap.parse_args(argv)
    if not args.tables:
        learn()
    results = [timing(target) for target in TARGETS]
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    md = []
    for result in results:
        md += table_lines(result, check_reference(result))
    (HERE / "tables.md").write_text("\n".join(md))
    print(f"wrote {HERE / 'results.json'} and {HERE / 'tables.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

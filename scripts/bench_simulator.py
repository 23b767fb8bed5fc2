"""CPU time of lowbw-simulate at scale: 64 stages x 256 microbatches x 10 steps (target: < 1 s per schedule).

    python scripts/bench_simulator.py [--rounds N] [extra overrides...]

For 1F1B, ZB-H1 and interleaved 1F1B (v = 2) on the default net (global, 8 AWS regions) and model (GPT
1.3B on H100s), per schedule, the median over rounds of the CPU time of:

* ``simulate()`` as it runs by default (steps played until one repeats the previous, the rest extrapolated);
* the same with ``sim.extrapolate=false`` (every step played): the reference, and the ratio of the two;
* ``build_schedule`` alone (generation, lowering, validation), which both include -- with Python's cyclic
  garbage collector paused, as ``simulate()`` pauses it.

It also checks that both give the same summary numbers to 1e-9 relative, and prints the machine's load:
CPU time of a shared machine grows with its load.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time

cpu_start = time.process_time()

from lowbw.pipeline.schedules import build_schedule  # noqa: E402
from lowbw.simulate import compose, format_simulation, simulate  # noqa: E402

SCHEDULES = (["schedule=1f1b"], ["schedule=zb_h1"], ["schedule=interleaved_1f1b", "schedule.virtual_stages=2"])
SCALE = ["pipeline.stages=64", "pipeline.microbatches=256", "sim.steps=10", "sim.picture_steps=0"]
TARGET_S = 1.0  # the aim: under 1 s of CPU per schedule at this scale


def cpu(fn) -> tuple[float, object]:
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def cpu_collector_paused(fn) -> tuple[float, object]:
    gc.disable()
    try:
        return cpu(fn)
    finally:
        gc.enable()


def same_numbers(a, b, where: str = "") -> list[str]:
    """Where two summaries differ by more than 1e-9 relative (CPU time, step counts excepted)."""
    if isinstance(a, dict):
        skip = ("sim_cpu_s", "steps_played", "steps_extrapolated")
        return [d for k in a if k not in skip for d in same_numbers(a[k], b.get(k), f"{where}.{k}")]
    if isinstance(a, list):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same_numbers(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isfinite(a):
        return [] if math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-300) else [f"{where}: {a!r} != {b!r}"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args, extra = ap.parse_known_args()
    la = os.getloadavg()
    print(f"machine: load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} on {os.cpu_count()} cores; "
          f"medians of {args.rounds} rounds, CPU seconds")
    table = []
    for sched in SCHEDULES:
        cfg = compose(SCALE + sched + extra)
        full_cfg = compose(SCALE + sched + extra + ["sim.extrapolate=false"])
        fast, full, build = [], [], []
        for _ in range(args.rounds):
            t, s = cpu(lambda: simulate(cfg))
            fast.append(t)
            t, s_full = cpu(lambda: simulate(full_cfg))
            full.append(t)
            build.append(cpu_collector_paused(lambda: build_schedule(cfg.schedule, 64, 256))[0])
        diffs = same_numbers(s, s_full)
        print(format_simulation(s))
        row = (" ".join(sched), statistics.median(fast), statistics.median(full), statistics.median(build))
        table.append(row)
        print(f"  BENCH {row[0]}: simulate() {row[1]:.2f} s ({s['steps_played']} steps played, "
              f"{s['steps_extrapolated']} extrapolated; {'under' if row[1] < TARGET_S else 'OVER'} the {TARGET_S:g} s "
              f"target) | every step played {row[2]:.2f} s, ratio {row[2] / row[1]:.1f}x | build_schedule {row[3]:.2f} s"
              f" | same numbers to 1e-9: {'yes' if not diffs else 'NO: ' + '; '.join(diffs[:3])}\n")
    print("| schedule | simulate() s | every step played s | ratio | build_schedule s |")
    print("|---|---:|---:|---:|---:|")
    for name, f, full, b in table:
        print(f"| {name} | {f:.2f} | {full:.2f} | {full / f:.1f} | {b:.2f} |")
    print(f"\nwhole process, imports included: {time.process_time() - cpu_start:.2f} s CPU")
    sys.exit(0)


if __name__ == "__main__":
    main()

"""CPU time of lowbw-simulate at scale: 64 stages x 256 microbatches x 10 steps (target: < 10 s).

    python scripts/bench_simulator.py [extra overrides...]

Prints the CPU time of the simulation (``simulate``: schedule generation + validation, link model,
10 played steps) and of the whole process (imports included), for each schedule.
"""

from __future__ import annotations

import os
import sys
import time

cpu_start = time.process_time()

from lowbw.simulate import compose, format_simulation, simulate  # noqa: E402


def main(extra: list[str]) -> None:
    la = os.getloadavg()
    print(f"machine: load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} on {os.cpu_count()} cores")
    for sched in (["schedule=1f1b"], ["schedule=zb_h1"], ["schedule=interleaved_1f1b", "schedule.virtual_stages=2"]):
        over = ["pipeline.stages=64", "pipeline.microbatches=256", "sim.steps=10", "sim.picture_steps=0"] + sched + extra
        cfg = compose(over)
        t0 = time.process_time()
        s = simulate(cfg)
        cpu = time.process_time() - t0
        print(format_simulation(s))
        print(f"  BENCH {' '.join(sched)}: simulate() {cpu:.2f} s CPU for 64 stages x 256 microbatches x 10 steps "
              f"({'under' if cpu < 10 else 'OVER'} the 10 s target)\n")
    print(f"whole process, imports included: {time.process_time() - cpu_start:.2f} s CPU")


if __name__ == "__main__":
    main(sys.argv[1:])

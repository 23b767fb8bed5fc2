"""What each injected fault costs: tokens/s and joules per token with and without it.

    python scripts/fault_cost.py                      # tiny GPT, 4 stages, home broadband, virtual clock
    python scripts/fault_cost.py --steps 20 --out /tmp/faults

Runs the same training once without faults and once per fault (a 3x straggler on rank 1, a 3x
straggler in bursts, a 2 s outage of link 1->2, bandwidth halved after 2 s by a trace, 1% packet loss
on 50 ms links), all on the virtual clock with FLOP-based durations on the cpu_local profile, so
the differences are the faults' and not the machine's. Prints a table (and writes fault_cost.md):
tokens/s and J/token of each run and their ratio to the fault-free run. Energy is modelled.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

BASE = ["clock=virtual", "clock.durations=flops", "net=home", "progress=false", "train.eval_batches=1",
        "hardware=cpu_local"]


def faults(trace: Path) -> dict[str, list[str]]:
    return {
        "none": [],
        "straggler 3x on rank 1": ["faults.straggler_rank=1", "faults.straggler_factor=3"],
        "straggler 3x, 1 step in 4": ["faults.straggler_rank=1", "faults.straggler_factor=3",
                                      "faults.straggler_every=4", "faults.straggler_burst=1"],
        "outage of link 1->2, 2-4 s": ["faults.outages=[{link: '1->2', start_s: 2.0, end_s: 4.0}]"],
        "bandwidth halved after 2 s": [f"faults.bandwidth_trace={trace}"],
        "1% packet loss, 50 ms links": ["net.loss_rate=0.01", "net.latency_ms=50"],
        "50 ms links, no loss": ["net.latency_ms=50"],
    }


def main() -> None:
    from lowbw.train import compose, run

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default=None, help="folder for the runs and fault_cost.md (default: a temporary one)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="lowbw-faults-"))
    out.mkdir(parents=True, exist_ok=True)
    trace = out / "halve_at_2s.csv"
    trace.write_text("time_s,factor\n0,1.0\n2,0.5\n")

    rows = []
    for name, overrides in faults(trace).items():
        s = run(compose(BASE + [f"train.steps={args.steps}"] + overrides), out / name.replace(" ", "_").replace("/", "-"))
        rows.append((name, s["tokens_per_s"], s["energy"]["j_per_token"], s["bubble_fraction"]))
    base = {r[0]: r for r in rows}["none"]
    lines = ["| fault | tokens/s (virtual) | vs none | J/token (modelled) | vs none | bubble |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, tps, jpt, bubble in rows:
        lines.append(f"| {name} | {tps:,.1f} | {tps / base[1]:.3f} | {jpt:.4g} | {jpt / base[2]:.3f} | {bubble:.3f} |")
    table = "\n".join(lines)
    (out / "fault_cost.md").write_text(table + "\n")
    print(table)
    print(f"\nruns in {out}")


if __name__ == "__main__":
    main()

"""Joules per token against link bandwidth, by simulation: a 1.3B GPT on H100s, 8 pipeline stages.

    python scripts/energy_vs_bandwidth.py                       # writes experiments/energy_vs_bandwidth/
    python scripts/energy_vs_bandwidth.py --out /tmp/evb --steps 4

For each symmetric link bandwidth from 10 Gbit/s down to 10 Mbit/s (one-way latency 25 ms) and
each codec pair (none; int8 both ways; int4 forward + int8 backward; int4 both ways), lowbw-simulate
plays the 1F1B schedule with FLOP-based durations on the H100 profile and accounts energy with both
network models (intensity: kWh/GB; power: fixed power per link plus a marginal cost per bit).
It prints a table and writes table.csv, table.md and energy_vs_bandwidth.png. Every figure is
modelled (no tensors run); what compression does to the loss is not simulated -- see
experiments/bandwidth_vs_compression for that, measured on real runs.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

BANDWIDTHS_MBPS = [10_000, 3_000, 1_000, 300, 100, 30, 10]
CODECS = {  # label -> (fwd, bwd)
    "none": ("none", "none"),
    "int8/int8": ("int8", "int8"),
    "int4/int8": ("int4", "int8"),
    "int4/int4": ("int4", "int4"),
}
NETWORK_MODELS = ["intensity", "power"]


def simulate_one(bw: float, fwd: str, bwd: str, network: str, steps: int, stages: int, microbatches: int) -> dict:
    from lowbw.simulate import compose, simulate

    cfg = compose([
        "model=gpt_1b", "hardware=h100", "schedule=1f1b", "net=home", f"net.uplink_mbps={bw}",
        f"net.downlink_mbps={bw}", "net.latency_ms=25", f"compress/fwd={fwd}", f"compress/bwd={bwd}",
        f"energy.network={network}", f"energy.power.capacity_mbps={bw}", f"pipeline.stages={stages}",
        f"pipeline.microbatches={microbatches}", f"sim.steps={steps}", "sim.picture_steps=0",
    ])
    return simulate(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments/energy_vs_bandwidth")
    ap.add_argument("--steps", type=int, default=6, help="simulated steps per point (first is warm-up)")
    ap.add_argument("--stages", type=int, default=8)
    ap.add_argument("--microbatches", type=int, default=32)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.process_time()
    rows = []
    for network in NETWORK_MODELS:
        for label, (fwd, bwd) in CODECS.items():
            for bw in BANDWIDTHS_MBPS:
                s = simulate_one(bw, fwd, bwd, network, args.steps, args.stages, args.microbatches)
                e = s["energy"]
                rows.append({
                    "network_model": network, "codec": label, "bandwidth_mbps": bw,
                    "tokens_per_s": s["tokens_per_s"], "step_time_s": s["step_time_s"],
                    "bubble_fraction": s["bubble_fraction"], "bytes_per_token": s["bytes_per_token"],
                    "j_per_token": e["j_per_token"],
                    "compute_j_per_token": e["compute_j"] / e["tokens"],
                    "idle_j_per_token": e["idle_j"] / e["tokens"],
                    "network_j_per_token": e["network_j"] / e["tokens"],
                })
    cpu = time.process_time() - t0

    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = []
    for network in NETWORK_MODELS:
        lines += [f"\n### Network energy model: {network}\n",
                  "| bandwidth (Mbit/s) | " + " | ".join(f"{c} J/token" for c in CODECS) + " | best codec | "
                  + " | ".join(f"{c} tokens/s" for c in CODECS) + " |",
                  "|---:|" + "---:|" * len(CODECS) + "---|" + "---:|" * len(CODECS)]
        for bw in BANDWIDTHS_MBPS:
            sel = {r["codec"]: r for r in rows if r["network_model"] == network and r["bandwidth_mbps"] == bw}
            best = min(sel, key=lambda c: sel[c]["j_per_token"])
            lines.append(f"| {bw:,} | " + " | ".join(f"{sel[c]['j_per_token']:.4g}" for c in CODECS)
                         + f" | {best} | " + " | ".join(f"{sel[c]['tokens_per_s']:,.0f}" for c in CODECS) + " |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"\n{len(rows)} simulations in {cpu:.1f} s of CPU time; outputs in {out}/")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    for ax, network in zip(axes, NETWORK_MODELS):
        for label in CODECS:
            pts = [(r["bandwidth_mbps"], r["j_per_token"]) for r in rows
                   if r["network_model"] == network and r["codec"] == label]
            ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link bandwidth, each direction (Mbit/s)")
        ax.set_ylabel("energy per trained token (J, modelled)")
        ax.set_title(f"network energy model: {network}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(title="codec fwd/bwd")
    fig.suptitle(f"GPT 1.3B, {args.stages} H100 stages, 1F1B, {args.microbatches} microbatches, 25 ms one-way "
                 "(lowbw-simulate)")
    fig.tight_layout()
    fig.savefig(out / "energy_vs_bandwidth.png", dpi=120)


if __name__ == "__main__":
    main()

"""Bubble fraction vs microbatches: measured (lowbw-train, lowbw-simulate) against the closed forms.

Reads the run folders under experiments/bubble_vs_microbatches/sweep/{train_a,train_b,sim_a,sim_b}/ and
writes results.csv, results.md and bubble_vs_microbatches.png next to this file.

Formulas, p stages, m microbatches, T_F = T_I = T_W = 1 (full backward T_B = T_I + T_W = 2), free links:
  gpipe, 1f1b        (p-1)/(m+p-1)                           (GPipe, Huang et al. 2019; PipeDream-flush)
  interleaved_1f1b   (p-1)/(v*m+p-1)                         (Narayanan et al. 2021)
  zb_h1              idle per rank (p-1)(T_F+T_I-T_W) = (p-1): (p-1)/(3m+p-1), valid for m >= p
                     (Qi et al. 2024: a third of 1F1B's (p-1)(T_F+T_I+T_W))
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SWEEP = HERE / "sweep"


def formula(schedule: str, p: int, m: int, v: int) -> tuple[float, str]:
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1), "(p-1)/(m+p-1)"
    if schedule == "interleaved_1f1b":
        return (p - 1) / (v * m + p - 1), "(p-1)/(v*m+p-1)"
    if schedule == "zb_h1":
        return (p - 1) / (3 * m + p - 1), "(p-1)/(3m+p-1)" + ("" if m >= p else " (m<p: formula not valid)")
    raise ValueError(schedule)


def last_step_idle(run: Path) -> float | None:
    """Mean idle seconds per rank in the last step (metrics.jsonl; lowbw-train only)."""
    f = run / "metrics.jsonl"
    if not f.exists():
        return None
    last = [json.loads(line) for line in f.read_text().splitlines() if line.strip()][-1]
    idle = last.get("idle_s")
    return sum(idle) / len(idle) if idle else None


def rows() -> list[dict]:
    out = []
    for sub, source in (("train_a", "lowbw-train"), ("train_b", "lowbw-train"), ("train_c", "lowbw-train"),
                        ("sim_a", "lowbw-simulate"), ("sim_b", "lowbw-simulate")):
        for run in sorted((SWEEP / sub).glob("*/summary.json"), key=lambda f: int(f.parent.name)):
            s = json.loads(run.read_text())
            cfg_file = run.parent / "config.yaml"
            if not cfg_file.exists():
                cfg_file = run.parent / ".hydra" / "config.yaml"
            cfg = yaml.safe_load(cfg_file.read_text())
            sched = cfg["schedule"]["name"]
            p, m = cfg["pipeline"]["stages"], cfg["pipeline"]["microbatches"]
            v = cfg["schedule"].get("virtual_stages", 1) if sched == "interleaved_1f1b" else 1
            f, fname = formula(sched, p, m, v)
            b = s.get("bubble_fraction")
            out.append({
                "source": source, "run": f"{sub}/{run.parent.name}", "status": s.get("status"),
                "schedule": sched + (f" (v={v})" if v > 1 else ""), "p": p, "m": m,
                "step_time_s": s.get("step_time_s"), "bubble_measured": b, "bubble_formula": f,
                "abs_diff": None if b is None else abs(b - f), "formula": fname,
                "idle_s_per_rank": last_step_idle(run.parent),
            })
    return out


def main() -> int:
    data = rows()
    if not data:
        print("no runs under", SWEEP, file=sys.stderr)
        return 1
    keys = list(data[0].keys())
    with open(HERE / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(data)

    def fmt(x, spec):
        return "" if x is None else format(x, spec)

    lines = ["| source | schedule | p | m | step time (s, virtual) | bubble measured | formula | bubble formula | "
             "abs. diff | idle s/rank (last step) |", "|---|---|---|---|---|---|---|---|---|---|"]
    order = {"gpipe": 0, "1f1b": 1, "interleaved_1f1b (v=2)": 2, "zb_h1": 3}
    for r in sorted(data, key=lambda r: (r["source"] != "lowbw-train", order.get(r["schedule"], 9), r["m"])):
        lines.append(f"| {r['source']} | {r['schedule']} | {r['p']} | {r['m']} | {fmt(r['step_time_s'], '.1f')} | "
                     f"{fmt(r['bubble_measured'], '.4f')} | {r['formula']} | {fmt(r['bubble_formula'], '.4f')} | "
                     f"{fmt(r['abs_diff'], '.1e')} | {fmt(r['idle_s_per_rank'], '.2f')} |")
    # ZB-H1 idle vs 1F1B idle, same m (lowbw-train)
    tr = {(r["schedule"], r["m"]): r for r in data if r["source"] == "lowbw-train"}
    ratio_lines = ["| m | 1F1B idle s/rank | ZB-H1 idle s/rank | ratio ZB-H1 / 1F1B |", "|---|---|---|---|"]
    for m in (1, 2, 4, 8, 16):
        a, z = tr.get(("1f1b", m)), tr.get(("zb_h1", m))
        if a and z and a["idle_s_per_rank"] and z["idle_s_per_rank"] is not None:
            ratio_lines.append(f"| {m} | {a['idle_s_per_rank']:.2f} | {z['idle_s_per_rank']:.2f} | "
                               f"{z['idle_s_per_rank'] / a['idle_s_per_rank']:.3f} |")
    worst = max((r["abs_diff"] for r in data if r["abs_diff"] is not None and "not valid" not in r["formula"]),
                default=None)
    md = ["# Bubble fraction vs microbatches: measured vs formula (generated by analyse.py)", "",
          *lines, "", "ZB-H1 vs 1F1B, mean idle seconds per rank in the measured step (lowbw-train):", "",
          *ratio_lines, "",
          f"Largest absolute difference where the formula applies: {worst:.2e}" if worst is not None else ""]
    (HERE / "results.md").write_text("\n".join(md) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = {"gpipe": "C0", "1f1b": "C1", "interleaved_1f1b (v=2)": "C2", "zb_h1": "C3"}
    mm = [1, 2, 4, 8, 16]
    p = 4
    ax.plot(mm, [(p - 1) / (m + p - 1) for m in mm], "-", color="C0", label="formula GPipe / 1F1B: (p−1)/(m+p−1)")
    mi = [4, 8, 16]
    ax.plot(mi, [(p - 1) / (2 * m + p - 1) for m in mi], "-", color="C2", label="formula interleaved v=2: (p−1)/(2m+p−1)")
    mz = [4, 8, 16]
    ax.plot(mz, [(p - 1) / (3 * m + p - 1) for m in mz], "-", color="C3", label="formula ZB-H1 (m ≥ p): (p−1)/(3m+p−1)")
    markers = {"gpipe": "o", "1f1b": "x", "interleaved_1f1b (v=2)": "s", "zb_h1": "^"}
    for sched in colors:
        pts = sorted((r["m"], r["bubble_measured"]) for r in data
                     if r["source"] == "lowbw-train" and r["schedule"] == sched and r["bubble_measured"] is not None)
        if pts:
            ax.plot(*zip(*pts), linestyle="none", marker=markers[sched], color=colors[sched], markersize=8,
                    fillstyle="none" if sched == "gpipe" else "full", label=f"lowbw-train {sched}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(mm)
    ax.set_xticklabels([str(m) for m in mm])
    ax.set_xlabel("microbatches per step, m")
    ax.set_ylabel("bubble fraction (idle share of rank-seconds)")
    ax.set_title("Pipeline bubble vs microbatches, p = 4 stages, T_F = T_I = T_W, free links\n"
                 "lowbw-train on the virtual clock (markers) vs closed forms (lines)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "bubble_vs_microbatches.png", dpi=120)
    print((HERE / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

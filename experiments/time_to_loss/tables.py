"""The tables of experiments/time_to_loss/README.md, from study.py's results (results.json)."""

from __future__ import annotations

MAIN_BANDWIDTHS = (10, 100, 1000)


def _h(seconds: float) -> str:
    """Seconds in the unit that keeps three figures: s, min or h."""
    if seconds < 120:
        return f"{seconds:,.1f} s"
    return f"{seconds / 60:,.1f} min" if seconds < 7200 else f"{seconds / 3600:,.2f} h"


def _mj(joules: float) -> str:
    return f"{joules / 1e3:,.1f} kJ" if joules < 1e6 else f"{joules / 1e6:,.2f} MJ"


def _range(c: dict, key: str, fmt) -> str:
    lo, hi = c.get(f"{key}_min_s" if key == "time" else f"{key}_min"), c.get(f"{key}_max_s" if key == "time" else f"{key}_max")
    return "" if lo is None or lo == hi else f" ({fmt(lo)}–{fmt(hi)})"


def best_baseline(result: dict, name: str) -> tuple[str, dict]:
    """The baseline's fastest schedule to the target."""
    cells = {k.split("/")[1]: v for k, v in result["baselines"].items() if k.startswith(name + "/")}
    sched = min(cells, key=lambda s: cells[s]["step_time_s"])
    return sched, cells[sched]


def learning_table(result: dict) -> list[str]:
    out = ["| method | seed | steps to target (first crossing) | interpolated step | best val loss | "
           "final val loss | run's own time to target (its cell) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for method, runs in result["learning"].items():
        for r in runs:
            t = r["target"]
            first, interp = t["first_crossing"], t["interpolated"]
            out.append(f"| {method} | {r['seed']} | {first['step'] + 1 if first else 'not reached'} | "
                       f"{'' if not interp else format(interp['step'] + 1, '.1f')} | {t['best_val_loss']:.4f} | {r['val_loss']:.4f} | "
                       f"{_h(first['time_s']) if first else ''} |")
    return out


def baseline_table(result: dict) -> list[str]:
    out = ["| baseline | schedule | step time s | bubble | time to target | J to target | of which network |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for key, c in result["baselines"].items():
        name, sched = key.split("/")
        out.append(f"| {name} | {sched} | {c['step_time_s']:.3f} | {c['bubble']:.3f} | {_h(c['time_s'])} | "
                   f"{_mj(c['joules'])} | {100 * c['network_j'] / c['j_per_step']:.1f}% |")
    return out


def cells_table(result: dict) -> list[str]:
    _, dc = best_baseline(result, "datacenter_h100")
    out = ["| Mbit/s | method | schedule | step time s | bubble | time to target (range over seeds) | × datacenter H100 "
           "| J to target | × datacenter J | network share of J |", "|---:|---|---|---:|---:|---|---:|---|---:|---:|"]
    for c in sorted(result["cells"], key=lambda c: (c["mbps"], c["method"], c["schedule"])):
        if c["mbps"] not in MAIN_BANDWIDTHS or "time_s" not in c:
            continue
        out.append(f"| {c['mbps']:g} | {c['method']} | {c['schedule']} | {c['step_time_s']:.3f} | {c['bubble']:.3f} | "
                   f"{_h(c['time_s'])}{_range(c, 'time', _h)} | {c['time_s'] / dc['time_s']:.2f} | "
                   f"{_mj(c['joules'])}{_range(c, 'joules', _mj)} | {c['joules'] / dc['joules']:.2f} | "
                   f"{100 * c['network_j'] / c['j_per_step']:.1f}% |")
    return out


def fastest_by_bandwidth(result: dict) -> list[dict]:
    """Per bandwidth of the fine grid: the fastest (method, schedule) to the target."""
    out = []
    for mbps in sorted({c["mbps"] for c in result["cells"]}):
        cells = [c for c in result["cells"] if c["mbps"] == mbps and "time_s" in c]
        if cells:
            out.append(min(cells, key=lambda c: c["time_s"]))
    return out


def crossover_table(result: dict) -> list[str]:
    _, h100 = best_baseline(result, "datacenter_h100")
    _, own = best_baseline(result, "datacenter_rtx4090")
    out = ["| Mbit/s | fastest method / schedule | time to target | × datacenter H100 | × the same RTX 4090s in a "
           "datacenter | J × datacenter H100 | J × RTX 4090s in a datacenter |", "|---:|---|---:|---:|---:|---:|---:|"]
    for c in fastest_by_bandwidth(result):
        out.append(f"| {c['mbps']:g} | {c['method']} / {c['schedule']} | {_h(c['time_s'])} | "
                   f"{c['time_s'] / h100['time_s']:.2f} | {c['time_s'] / own['time_s']:.2f} | "
                   f"{c['joules'] / h100['joules']:.2f} | {c['joules'] / own['joules']:.2f} |")
    return out


def within(result: dict, baseline: str, margin: float = 1.10) -> dict | None:
    """The lowest bandwidth of the fine grid at which some method and schedule come within ``margin`` of the
    baseline's best time to the target, or None."""
    _, ref = best_baseline(result, baseline)
    for c in fastest_by_bandwidth(result):
        if c["time_s"] <= margin * ref["time_s"]:
            return c
    return None


def table_lines(result: dict, check: list[str]) -> list[str]:
    """tables.md's section for one target loss."""
    md = [f"# Target validation loss {result['target']} (written by study.py)", "",
          "## Learning runs (tiny GPT, 8 stages; regime gpt_1b on 8x rtx4090, 100 Mbit/s home, 1F1B)", "",
          "Steps count from 1 (the first crossing at step index s is s + 1 steps).", ""]
    md += learning_table(result) + ["", "## Baselines: the same model and pipeline in a datacenter", ""]
    md += baseline_table(result) + ["", "## Cells: home broadband (symmetric), 8 x RTX 4090", ""]
    md += cells_table(result) + ["", "## Fastest method and schedule per bandwidth (finer grid)", ""]
    md += crossover_table(result) + [""]
    for name in ("datacenter_h100", "datacenter_rtx4090"):
        for margin in (1.10, 2.0):
            c = within(result, name, margin)
            md.append(f"- within {margin:.2f}x of {name}'s time to target: "
                      + ("at no bandwidth of the grid" if c is None else f"from {c['mbps']:g} Mbit/s ({c['method']} / "
                         f"{c['schedule']}, {c['time_s'] / best_baseline(result, name)[1]['time_s']:.2f}x)"))
    md += ["", "## The learning runs' own clocks against steps x the simulated step time (their cell)", "",
           "| method | seed | first-crossing step | run's clock s | steps x simulated step s | difference |",
           "|---|---:|---:|---:|---:|---:|"] + check + [""]
    return md

"""The report's figures (PNG). A figure with nothing to show (e.g. a simulator sweep without losses, runs
without energy) is not written; :func:`write_plots` returns why, and report.md says so."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

PLOTS = {
    "throughput_vs_bandwidth": "throughput_vs_bandwidth.png",
    "energy_vs_bandwidth": "energy_vs_bandwidth.png",
    "val_loss_curves": "val_loss_curves.png",
    "pareto_loss_vs_throughput": "pareto_loss_vs_throughput.png",
}
_MARKERS = "osD^vP*Xh<>"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _clock(rows: list[dict]) -> str:
    clocks = sorted({r["clock"] for r in rows if r.get("clock")})
    return "/".join(clocks) if clocks else "unknown"


def _series_key(rows: list[dict]) -> tuple[callable, str]:
    """Lines are per codec; when the sweep also varies the schedule (or the network name at one bandwidth),
    those are part of the line's label too."""
    parts = ["codec"]
    if len({r.get("schedule") for r in rows}) > 1:
        parts.append("schedule")
    return (lambda r: " | ".join(str(r.get(p)) for p in parts)), " | ".join(parts)


class NoData(Exception):
    """The figure has nothing to show; the message says why."""


def _empty(ax, title: str, why: str) -> None:
    _plt().close(ax.figure)
    raise NoData(why)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def _styles(labels: list[str]) -> dict[str, dict]:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {lab: {"color": cmap(i % cmap.N), "marker": _MARKERS[i % len(_MARKERS)]} for i, lab in enumerate(labels)}


def _vs_bandwidth(rows: list[dict], value: str, path: Path, title: str, ylabel: str, why_empty: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    pts = [r for r in rows if r["status"] == "completed" and _finite(r.get("bandwidth_mbps"))
           and _finite(r.get(value))]
    if not pts:
        _empty(ax, title, why_empty)
        return _save(fig, path)
    key, legend_title = _series_key(pts)
    series: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in pts:
        series[key(r)][r["bandwidth_mbps"]].append(r[value])
    styles = _styles(sorted(series))
    for lab in sorted(series):
        xs = sorted(series[lab])
        ys = [sum(series[lab][x]) / len(series[lab][x]) for x in xs]
        ax.plot(xs, ys, label=lab, linewidth=1.5, markersize=6, **styles[lab])
    ax.set_xscale("log")
    ys_all = [r[value] for r in pts if r[value] > 0]
    if ys_all and max(ys_all) / min(ys_all) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("bottleneck link bandwidth (Mbit/s, log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title=legend_title, fontsize=8, title_fontsize=8, loc="best")
    return _save(fig, path)


def throughput_vs_bandwidth(rows: list[dict], path: Path) -> Path:
    clock = _clock(rows)
    return _vs_bandwidth(rows, "tokens_per_s", path,
                         f"Training throughput vs link bandwidth, per codec ({clock} clock)",
                         f"throughput (tokens/s, {clock} clock)",
                         "no completed run has both a throughput and a finite link bandwidth")


def energy_vs_bandwidth(rows: list[dict], path: Path) -> Path:
    labels = sorted({r["energy_source"] for r in rows if r.get("energy_source")})
    src = "/".join(labels) if labels else "modelled"
    return _vs_bandwidth(rows, "j_per_token", path,
                         f"Energy per token vs link bandwidth, per codec ({src}, {_clock(rows)} clock)",
                         f"energy (J/token, {src}: compute + idle + network)",
                         "no completed run recorded energy (summary.json has no 'energy')")


def val_loss_curves(rows: list[dict], path: Path) -> Path:
    plt = _plt()
    title = "Validation loss during training, per codec"
    fig, ax = plt.subplots(figsize=(11, 4.8))
    done = [r for r in rows if r["status"] == "completed" and r.get("_metrics")]
    val: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    train: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in done:
        for m in r["_metrics"]:
            step = m.get("step")
            if not isinstance(step, int):
                continue
            if _finite(m.get("val_loss")):
                val[r["codec"]][step].append(m["val_loss"])
            if _finite(m.get("loss")):
                train[r["codec"]][step].append(m["loss"])
    if not val and not train:
        _empty(ax, title, "no completed run recorded a loss (metrics.jsonl has no loss)")
        return _save(fig, path)
    styles = _styles(sorted(set(val) | set(train)))
    for lab in sorted(set(val) | set(train)):
        st = styles[lab]
        if lab in val:
            xs = sorted(val[lab])
            mean = [sum(val[lab][x]) / len(val[lab][x]) for x in xs]
            ax.plot(xs, mean, label=f"{lab} (validation)", color=st["color"], marker=st["marker"], linewidth=1.8)
            lo, hi = [min(val[lab][x]) for x in xs], [max(val[lab][x]) for x in xs]
            if any(a != b for a, b in zip(lo, hi)):
                ax.fill_between(xs, lo, hi, color=st["color"], alpha=0.15)
        if lab in train:
            xs = sorted(train[lab])
            mean = [sum(train[lab][x]) / len(train[lab][x]) for x in xs]
            ax.plot(xs, mean, label=f"{lab} (training)", color=st["color"], linestyle="--", linewidth=0.9, alpha=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set_title(title + ("" if val else " (no validation points: training loss only)"))
    ax.grid(True, alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(title="codec fwd/bwd\nsolid: validation (mean; band: min-max over runs)\ndashed: training",
              fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when maximising x (throughput) and minimising y (loss)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 <= y) and (x2 > x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def loss_column(rows: list[dict]) -> Optional[str]:
    done = [r for r in rows if r["status"] == "completed"]
    for col in ("val_loss", "train_loss"):
        if any(_finite(r.get(col)) for r in done):
            return col
    return None


def pareto_loss_vs_throughput(rows: list[dict], path: Path) -> Path:
    plt = _plt()
    col = loss_column(rows)
    which = "validation" if col == "val_loss" else "training"
    title = f"Loss vs throughput: Pareto front ({_clock(rows)} clock)"
    fig, ax = plt.subplots(figsize=(11, 4.8))
    pts = [r for r in rows if col and r["status"] == "completed" and _finite(r.get("tokens_per_s"))
           and _finite(r.get(col))]
    if not pts:
        _empty(ax, title, "no completed run has both a throughput and a loss")
        return _save(fig, path)
    key, legend_title = _series_key(pts)
    styles = _styles(sorted({key(r) for r in pts}))
    for lab in sorted(styles):
        sel = [r for r in pts if key(r) == lab]
        ax.scatter([r["tokens_per_s"] for r in sel], [r[col] for r in sel], label=lab, s=36,
                   color=styles[lab]["color"], marker=styles[lab]["marker"])
    xy = [(r["tokens_per_s"], r[col]) for r in pts]
    front = pareto_front(xy)
    ax.step([xy[i][0] for i in front], [xy[i][1] for i in front], where="pre", color="black", linewidth=1.2,
            label="Pareto front (no run is both faster and lower-loss)")
    for i in front:
        r = pts[i]
        bw = r.get("bandwidth_mbps")
        note = r["codec"] + (f" @ {bw:g} Mbit/s" if _finite(bw) else "")
        ax.annotate(note, xy[i], textcoords="offset points", xytext=(4, 4), fontsize=6)
    ax.set_xscale("log" if max(x for x, _ in xy) / max(min(x for x, _ in xy), 1e-12) > 100 else "linear")
    ax.set_xlabel(f"throughput (tokens/s, {_clock(pts)} clock)")
    ax.set_ylabel(f"final {which} loss (nats/token)")
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(title=legend_title, fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def write_plots(rows: list[dict], out: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Write every figure that has data: ({name: path written}, {name: why it was not written})."""
    out.mkdir(parents=True, exist_ok=True)
    fns = {"throughput_vs_bandwidth": throughput_vs_bandwidth, "energy_vs_bandwidth": energy_vs_bandwidth,
           "val_loss_curves": val_loss_curves, "pareto_loss_vs_throughput": pareto_loss_vs_throughput}
    written, skipped = {}, {}
    for name, fname in PLOTS.items():
        stale = out / fname
        try:
            written[name] = fns[name](rows, stale)
        except NoData as e:
            skipped[name] = str(e)
            if stale.is_file():  # left by an earlier report of this folder: no longer true
                stale.unlink()
    return written, skipped

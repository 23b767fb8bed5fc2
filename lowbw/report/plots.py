"""The report's figures: PNG for report.md and PDF beside it, one look (:mod:`lowbw.report.style`).

Every figure shows each run on its own -- nothing is averaged -- and shows what the sweep varied by colour,
marker and panels (:mod:`lowbw.report.facets`); its title names those settings. A figure with nothing to show
(a simulator sweep has no loss, old runs no energy) is not written: :func:`write_plots` returns why, and
report.md says so.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lowbw.report.curves import Curve, run_curve
from lowbw.report.facets import Layout, layout
from lowbw.report.style import (broken_axis, colour, figure_style, header_handle, linestyle, marker, new_figure,
                                place_labels, quantity_axis, save)

PLOTS = {
    "throughput_vs_bandwidth": "throughput_vs_bandwidth.png",
    "energy_vs_bandwidth": "energy_vs_bandwidth.png",
    "pareto_loss_vs_throughput": "pareto_loss_vs_throughput.png",
    "loss_vs_step": "loss_vs_step.png",
    "loss_vs_time": "loss_vs_time.png",
    "loss_vs_energy": "loss_vs_energy.png",
}
#: gids of the artists tests and readers count: one "series" line per group of runs, the Pareto front.
SERIES_GID = "series"
FRONT_GID = "pareto-front"
TARGET_GID = "target-loss"  # the dashed target validation loss of runs with train.target_loss
CROSSING_GID = "target-crossing"  # each run's first evaluation at or below it, ringed
#: Points of one series are joined by a line only from three x values on: a line between two samples
#: decades apart claims a shape nobody measured.
MIN_POINTS_FOR_LINE = 3
_PANEL_W, _PANEL_H, _LEGEND_W = 4.4, 3.3, 2.4  # inches


class NoData(Exception):
    """The figure has nothing to show; the message says why."""


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _clock(rows: list[dict]) -> str:
    clocks = sorted({r["clock"] for r in rows if r.get("clock")})
    return "/".join(clocks) if clocks else "unknown"


def loss_column(rows: list[dict]) -> Optional[str]:
    done = [r for r in rows if r["status"] == "completed"]
    for col in ("val_loss", "train_loss"):
        if any(_finite(r.get(col)) for r in done):
            return col
    return None


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when maximising x (throughput) and minimising y (loss), by x."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 <= y) and (x2 > x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


# ---- the frame every figure shares: panels, legend, title ---------------------------------------------------


def _panels(rows: list[dict], lay: Layout, title: str):
    """(figure, [(axes, rows of that panel)]) with one panel per combination of ``lay.panels``."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[lay.panel_key(r)].append(r)
    keys = sorted(groups)
    ncols = min(len(keys), 3)
    nrows = -(-len(keys) // ncols)
    fig = new_figure(_PANEL_W * ncols + _LEGEND_W, _PANEL_H * nrows + 0.8)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    out = []
    for ax, key in zip(axes.flat, keys):
        if lay.panels:
            ax.set_title(lay.panel_title(key), fontsize=9)
        out.append((ax, groups[key]))
    varied = lay.varied_text()
    fig.suptitle(f"{title}\n" + (f"varied: {varied}" if varied else "one configuration"), fontsize=10)
    return fig, out


def _legend(fig, lay: Layout, lines: bool, extra: tuple = ()) -> None:
    """One legend at the right: a section per styled setting (colour, then marker / line style)."""
    handles, labels = [], []
    headers = {d.label for d in (lay.colour, lay.style) if d is not None}
    if lay.colour is not None:
        h, t = header_handle(lay.colour.label)
        handles.append(h), labels.append(t)
        for i, v in enumerate(lay.colour_values):
            handles.append(Line2D([], [], color=colour(i), marker=None if lay.style else marker(0),
                                  linestyle="-" if lines or lay.style else "none"))
            labels.append(v)
    if lay.style is not None:
        h, t = header_handle(lay.style.label)
        handles.append(h), labels.append(t)
        for i, v in enumerate(lay.style_values):
            handles.append(Line2D([], [], color="0.35", marker=None if lines else marker(i),
                                  linestyle=linestyle(i) if lines else "none"))
            labels.append(v)
    for h, t in extra:
        handles.append(h), labels.append(t)
    if handles:
        leg = fig.legend(handles, labels, loc="upper left", frameon=False, handlelength=2.2,
                         bbox_to_anchor=(1 - _LEGEND_W / fig.get_figwidth() + 0.01, 0.88))
        for t in leg.get_texts():
            if t.get_text() in headers:
                t.set_fontweight("bold")


def _finish(fig) -> Figure:
    shown = {(a.get_subplotspec().rowspan.start, a.get_subplotspec().colspan.start) for a in fig.axes
             if a.get_visible()}
    for ax in fig.axes:  # shared axes: axis labels and tick labels on the outer panels only
        row, col = ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start
        if col > 0:
            ax.set_ylabel("")
            ax.tick_params(labelleft=False)
        if (row + 1, col) in shown:
            ax.set_xlabel("")
            ax.tick_params(labelbottom=False)
    fig.tight_layout(rect=(0, 0, 1 - _LEGEND_W / fig.get_figwidth(), 1))
    return fig


# ---- run-per-point figures -------------------------------------------------------------------------------------


def _points(ax, rows: list[dict], lay: Layout, x: str, y: str) -> None:
    """Each group of runs (equal in every varied setting but x) as one series; joined from 3 x values on."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[lay.group_key(r)].append(r)
    for key in sorted(groups):
        g = sorted(groups[key], key=lambda r: r[x])
        joined = len({r[x] for r in g}) >= MIN_POINTS_FOR_LINE
        ax.plot([r[x] for r in g], [r[y] for r in g], color=colour(lay.colour_index(g[0])),
                marker=marker(lay.style_index(g[0])), linestyle="-" if joined else "none", markeredgecolor="white",
                markeredgewidth=0.6, alpha=0.9,
                label=lay.series_label(g[0]), gid=SERIES_GID)


def _name_along_x(ax, rows: list[dict], lay: Layout, x: str) -> None:
    """Write the settings that go one-to-one with x (a network preset's name) above their x position."""
    if not lay.along_x:
        return
    names = {r[x]: ", ".join(d.text(r) for d in lay.along_x) for r in rows}
    for xv, text in sorted(names.items()):
        ax.annotate(text, (xv, 1.0), xycoords=ax.get_xaxis_transform(), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7, color="0.25")
        ax.axvline(xv, color="0.8", linewidth=0.6, linestyle=":", zorder=0)


def _vs_bandwidth(rows: list[dict], value: str, title: str, ylabel: str, why_empty: str) -> Figure:
    pts = [r for r in rows if r["status"] == "completed" and _finite(r.get("bandwidth_mbps"))
           and _finite(r.get(value))]
    if not pts:
        raise NoData(why_empty)
    if len({r["bandwidth_mbps"] for r in pts}) < 2:
        raise NoData(f"every run has the same bandwidth ({pts[0]['bandwidth_mbps']:g} Mbit/s): nothing to plot against")
    lay = layout(pts, x_key="bandwidth_mbps", force_panels=("clock",))
    with figure_style():
        fig, panels = _panels(pts, lay, title)
        for ax, sel in panels:
            _points(ax, sel, lay, "bandwidth_mbps", value)
            quantity_axis(ax, [r["bandwidth_mbps"] for r in pts], "x", "bottleneck link bandwidth (Mbit/s)")
            quantity_axis(ax, [r[value] for r in pts], "y", ylabel)
            _name_along_x(ax, sel, lay, "bandwidth_mbps")
        _legend(fig, lay, lines=False)
        return _finish(fig)


def throughput_vs_bandwidth(rows: list[dict]) -> Figure:
    clock = _clock(rows)
    return _vs_bandwidth(rows, "tokens_per_s", f"Training throughput vs link bandwidth ({clock} clock)",
                         f"throughput (tokens/s, {clock} clock)",
                         "no completed run has both a throughput and a finite link bandwidth")


def energy_vs_bandwidth(rows: list[dict]) -> Figure:
    labels = sorted({r["energy_source"] for r in rows if r.get("energy_source")})
    src = "/".join(labels) if labels else "modelled"
    return _vs_bandwidth(rows, "j_per_token", f"Energy per token vs link bandwidth ({src})",
                         f"energy (J/token, {src})",
                         "no completed run recorded energy (summary.json has no 'energy')")


def pareto_loss_vs_throughput(rows: list[dict]) -> Figure:
    col = loss_column(rows)
    pts = [r for r in rows if col and r["status"] == "completed" and _finite(r.get("tokens_per_s"))
           and _finite(r.get(col))]
    if not pts:
        raise NoData("no completed run has both a throughput and a loss")
    which = "validation" if col == "val_loss" else "training"
    lay = layout(pts, force_panels=("clock",))
    with figure_style():
        fig, panels = _panels(pts, lay, f"Final {which} loss vs throughput, Pareto front ({_clock(pts)} clock)")
        for ax, sel in panels:
            _points(ax, sel, lay, "tokens_per_s", col)
            xy = [(r["tokens_per_s"], r[col]) for r in sel]
            front = pareto_front(xy)
            fx, fy = [xy[i][0] for i in front], [xy[i][1] for i in front]
            # the staircase bounding the region no run reaches; hollow rings mark the runs on it
            ax.plot(fx, fy, drawstyle="steps-post", color="black", linewidth=1.0, marker="o", markersize=11,
                    markerfacecolor="none", markeredgewidth=1.0, zorder=1, gid=FRONT_GID)
            quantity_axis(ax, [r["tokens_per_s"] for r in pts], "x", f"throughput (tokens/s, {_clock(pts)} clock)")
            broken_axis(ax, [r[col] for r in pts], f"final {which} loss (nats/token)")
            ax.margins(x=0.08)
            place_labels(fig, ax, [xy[i] for i in front], [", ".join(d.describe(sel[i]) for d in lay.dims
                                                                     if d not in lay.panels) or sel[i]["run"]
                                                           for i in front])
        front_handle = Line2D([], [], color="black", linewidth=1.0, marker="o", markersize=9, markerfacecolor="none")
        _legend(fig, lay, lines=False, extra=(header_handle(""), (front_handle, "Pareto front: no run both\n"
                                                                                "faster and lower-loss")))
        return _finish(fig)


# ---- run-per-curve figures -------------------------------------------------------------------------------------


def _loss_curves(rows: list[dict], x: Callable[[Curve], Optional[list[float]]], what: str, xlabel: str,
                 why_empty: str) -> Figure:
    done = [(r, run_curve(r)) for r in rows if r["status"] == "completed"]
    done = [(r, c) for r, c in done if c is not None and x(c)]
    if not done:
        raise NoData(why_empty)
    kinds = {c.kind for _, c in done}
    kind = "validation" if kinds == {"validation"} else "/".join(sorted(kinds))
    lay = layout([r for r, _ in done], force_panels=("clock",))
    curve_of = {id(r): c for r, c in done}
    targets = sorted({r["target_loss"] for r, c in done if c.kind == "validation" and _finite(r.get("target_loss"))})
    title = f"{kind.capitalize()} loss vs {what}, one curve per run"
    with figure_style():
        fig, panels = _panels([r for r, _ in done], lay, title + ("; dashed: target loss" if targets else ""))
        for ax, sel in panels:
            for r in sel:
                c = curve_of[id(r)]
                ax.plot(x(c), c.loss, color=colour(lay.colour_index(r)), linestyle=linestyle(lay.style_index(r)),
                        marker="o" if len(c.loss) < 30 else None, markersize=3.5, label=lay.series_label(r),
                        gid=SERIES_GID)
                _first_crossing(ax, r, c, x(c))
            for t in targets:
                ax.axhline(t, color="black", linestyle="--", linewidth=0.9, gid=TARGET_GID)
            quantity_axis(ax, [v for _, c in done for v in x(c)], "x", xlabel.format(clock=_clock(sel)))
            broken_axis(ax, [v for _, c in done for v in c.loss] + targets, f"{kind} loss (nats/token)")
        extra = () if not targets else (
            (Line2D([], [], color="black", linestyle="--", linewidth=0.9), "target loss"),
            (Line2D([], [], marker="o", markersize=9, markerfacecolor="none", markeredgecolor="black",
                    linestyle="none"), "first evaluation at\nor below the target"))
        _legend(fig, lay, lines=True, extra=extra)
        return _finish(fig)


def _first_crossing(ax, row: dict, c: Curve, xs: list[float]) -> None:
    """Ring the evaluation at which the run's validation loss first reached its target (summary's target block)."""
    if c.kind != "validation" or row.get("target_reached") != "yes" or row.get("target_step") not in c.step:
        return
    i = c.step.index(row["target_step"])
    ax.scatter([xs[i]], [c.loss[i]], s=90, facecolors="none", edgecolors="black", linewidths=1.1, zorder=5,
               gid=CROSSING_GID)


def loss_vs_step(rows: list[dict]) -> Figure:
    return _loss_curves(rows, lambda c: [float(s) for s in c.step], "optimizer step", "optimizer step",
                        "no completed run recorded a loss in metrics.jsonl")


def loss_vs_time(rows: list[dict]) -> Figure:
    return _loss_curves(rows, lambda c: c.time_s, "training time", "training time (s, {clock} clock)",
                        "no completed run recorded a loss in metrics.jsonl")


def loss_vs_energy(rows: list[dict]) -> Figure:
    return _loss_curves(rows, lambda c: c.joules, "energy", "energy spent (J, modelled)",
                        "no completed run recorded both a loss and its energy")


#: name -> the function drawing that figure from the report's rows (raises NoData when it has nothing to show)
FIGURES: dict[str, Callable[[list[dict]], Figure]] = {
    "throughput_vs_bandwidth": throughput_vs_bandwidth, "energy_vs_bandwidth": energy_vs_bandwidth,
    "pareto_loss_vs_throughput": pareto_loss_vs_throughput, "loss_vs_step": loss_vs_step,
    "loss_vs_time": loss_vs_time, "loss_vs_energy": loss_vs_energy,
}


def write_plots(rows: list[dict], out: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Write every figure that has data (PNG + PDF): ({name: PNG written}, {name: why it was not written})."""
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = {}, {}
    for name, fname in PLOTS.items():
        png = out / fname
        try:
            written[name] = save(FIGURES[name](rows), png)
        except NoData as e:
            skipped[name] = str(e)
            for stale in (png, png.with_suffix(".pdf")):  # left by an earlier report of this folder
                stale.unlink(missing_ok=True)
    return written, skipped

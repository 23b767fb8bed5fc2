"""One look for every figure of a report, and the axis rules they all follow.

* Colours: the Okabe-Ito palette (Okabe & Ito 2008, "Color Universal Design", reproduced in Wong 2011,
  Nature Methods 8:441), readable with every common colour-vision deficiency; tab20 beyond eight series.
* Every figure is saved twice: a PNG for report.md and a PDF beside it for a paper (TrueType fonts,
  ``pdf.fonttype`` 42, the embedding journals' submission checkers ask for).
* A quantity axis (throughput, J/token, time, joules) starts at zero on a linear scale, so that a 1 %
  difference looks like 1 %; it turns logarithmic only when the data spans :data:`LOG_SPAN` or more, and then
  says "log scale". An axis that does not start at zero (loss) carries break marks at its foot.

Figures are made with :class:`matplotlib.figure.Figure` directly (no pyplot): no global state and no
backend switch in a library that a notebook may import.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
MARKERS = "osD^vP*Xh<>"
LINESTYLES = ["-", "--", ":", "-."]
#: An axis turns logarithmic when its largest positive value is this many times its smallest: two decades.
LOG_SPAN = 100.0
#: A broken (not from zero) axis spans at least this share of its largest value: 5 %, e.g. 0.19 nats at a
#: loss of 3.9.
MIN_BROKEN_SPAN = 0.05
#: gid of the break marks drawn at the foot of an axis that does not start at zero (tests look for it).
BREAK_GID = "axis-break"

RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "legend.title_fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.5,
    "lines.markersize": 6,
    "savefig.dpi": 150,
    "pdf.fonttype": 42,
    "axes.formatter.useoffset": False,
}


@contextmanager
def figure_style() -> Iterator[None]:
    with matplotlib.rc_context(RC):
        yield


def new_figure(width: float, height: float) -> Figure:
    """A figure with its own Agg canvas (renders PNGs and measures text without pyplot)."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def colour(i: int) -> str:
    if i < len(OKABE_ITO):
        return OKABE_ITO[i]
    return matplotlib.colormaps["tab20"](i % 20)


def marker(i: int) -> str:
    return MARKERS[i % len(MARKERS)]


def linestyle(i: int) -> str:
    return LINESTYLES[i % len(LINESTYLES)]


def save(fig: Figure, png: Path) -> Path:
    """Write ``png`` and the same figure as PDF beside it; return the PNG's path."""
    png = Path(png)
    fig.savefig(png)
    fig.savefig(png.with_suffix(".pdf"))
    return png


def spans_decades(values: Iterable[float]) -> bool:
    pos = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]
    return bool(pos) and max(pos) / min(pos) >= LOG_SPAN


def quantity_axis(ax, values: Iterable[float], axis: str, label: str) -> None:
    """Log scale when ``values`` span decades, else linear from zero. ``label`` gets ", log scale" when log."""
    values = list(values)
    if spans_decades(values):
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        label = _with_note(label, "log scale")
    else:
        top = max([v for v in values if math.isfinite(v)] + [0.0])
        (ax.set_xlim if axis == "x" else ax.set_ylim)(0.0, top * 1.08 if top > 0 else 1.0)
    (ax.set_xlabel if axis == "x" else ax.set_ylabel)(label)


def broken_axis(ax, values: Iterable[float], label: str) -> None:
    """A y axis fitted to the data (not from zero), with break marks at its foot saying so. The axis spans at
    least :data:`MIN_BROKEN_SPAN` of its top value, so that a difference of a few parts in ten thousand looks
    as small as it is instead of filling the plot."""
    vals = [v for v in values if math.isfinite(v)]
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * 0.08
    lo, hi = lo - pad, hi + pad
    short = MIN_BROKEN_SPAN * max(abs(hi), abs(lo), 1e-12) - (hi - lo)
    if short > 0:  # widen around the data's middle
        lo, hi = lo - short / 2, hi + short / 2
    ax.set_ylim(lo, hi)
    ax.set_ylabel(label)
    # two short slanted strokes across the foot of the y spine, in axes coordinates (drawn over the spine)
    for dy in (0.0, 0.025):
        ax.add_line(Line2D([-0.018, 0.018], [0.01 + dy, 0.035 + dy], transform=ax.transAxes, color="black",
                           linewidth=1.0, clip_on=False, gid=BREAK_GID, zorder=5))


def _with_note(label: str, note: str) -> str:
    if label.endswith(")"):
        return f"{label[:-1]}, {note})"
    return f"{label} ({note})"


def header_handle(text: str) -> tuple[Line2D, str]:
    """A legend row with no symbol: a section heading inside one legend."""
    return Line2D([], [], linestyle="none", marker="none"), text


def place_labels(fig: Figure, ax, points: list[tuple[float, float]], texts: list[str]) -> list:
    """Annotate ``points`` with ``texts`` inside the axes, nudging labels apart so none overlaps another or
    leaves the plot: a label goes to the side of its point facing the middle of the axes."""
    if not points:
        return []
    fig.canvas.draw()  # a renderer, for the labels' sizes
    renderer = fig.canvas.get_renderer()
    placed, boxes = [], []
    ax_box = ax.get_window_extent(renderer)
    for (x, y), text in sorted(zip(points, texts), key=lambda p: -p[0][1]):
        fx, fy = ax.transAxes.inverted().transform(ax.transData.transform((x, y)))
        dx = -6 if fx > 0.55 else 6
        dy = -10 if fy > 0.8 else 6
        ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7,
                          ha="right" if dx < 0 else "left", va="center",
                          bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
                          arrowprops={"arrowstyle": "-", "color": "0.5", "linewidth": 0.5})
        for _ in range(12):  # step away from the labels already placed (down if there is room, else up)
            bb = ann.get_window_extent(renderer)
            if not any(bb.overlaps(o) for o in boxes):
                break
            dy += -11 if bb.y0 - 14 > ax_box.y0 else 11
            ann.set_position((dx, dy))
        boxes.append(ann.get_window_extent(renderer))
        placed.append(ann)
    return placed

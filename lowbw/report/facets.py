"""What a sweep varied, and how a figure shows it: colour, marker, then one panel per remaining combination.

A figure never averages runs that differ in a varied setting: every run is its own point (or curve), and a
line joins only runs that differ in the plotted x setting alone. The varied settings are found in the runs
themselves -- the report's columns (codec, schedule, network, bandwidth, ...) first, then any other config
field that differs between runs which those columns do not already tell apart (``train.lr``,
``model.n_layer``, ...). A setting that follows from those already chosen (a preset's latency, once the
network name is a dimension) is left out, so that one setting is never shown twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

#: (row key, how a figure names it), in the order they take colour, marker, then panels.
COLUMN_DIMS: list[tuple[str, str]] = [
    ("codec", "codec (fwd/bwd)"),
    ("schedule", "schedule"),
    ("network", "network"),
    ("bandwidth_mbps", "bottleneck Mbit/s"),
    ("latency_ms", "latency ms"),
    ("stages", "stages"),
    ("microbatches", "microbatches"),
    ("seed", "seed"),
]
#: Config fields that never make a run different (where it writes, how it reports, how long it may take).
_NOT_SETTINGS = ("out_dir", "progress", "timeout_s", "resume", "checkpoint.dir", "sim.timeline", "data.path")


@dataclass(frozen=True)
class Dim:
    key: str
    label: str
    get: Callable[[dict], Any]

    def text(self, row: dict) -> str:
        v = self.get(row)
        if isinstance(v, float):
            return f"{v:g}"
        return "?" if v is None else str(v)

    def describe(self, row: dict) -> str:
        """The value as a point's label says it: "int8/none", "100 Mbit/s", "seed 2"."""
        v, text = self.get(row), self.text(row)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return text
        unit = self.label.rsplit(" ", 1)[-1] if self.label.endswith(("Mbit/s", " ms")) else None
        return f"{text} {unit}" if unit else f"{self.label} {text}"


def _column(key: str, label: str) -> Dim:
    return Dim(key, label, lambda r, k=key: r.get(k))


def _config(key: str) -> Dim:
    return Dim(key, key, lambda r, k=key: (r.get("_flat") or {}).get(k))


def _hashable(v: Any) -> Any:
    return json.dumps(v, sort_keys=True, default=str) if isinstance(v, (list, dict)) else v


def _determined(rows: list[dict], dim: Dim, by: list[Dim]) -> bool:
    """True when runs that agree on every dim in ``by`` also agree on ``dim``."""
    seen: dict[tuple, Any] = {}
    for r in rows:
        k = tuple(_hashable(d.get(r)) for d in by)
        v = _hashable(dim.get(r))
        if seen.setdefault(k, v) != v:
            return False
    return True


def varied(rows: list[dict], x_key: Optional[str] = None, given: tuple[str, ...] = ()) -> list[Dim]:
    """The settings that differ between ``rows``, fewest first that tell every run apart.

    ``x_key``: the row key on the x axis, never a dim itself. A named setting (a report column) that moves
    with x stays a dim -- a line must not join runs of two networks because their bandwidths differ -- but a
    bare config field that only encodes x (``net.uplink_mbps`` under a bandwidth axis) does not.
    ``given``: row keys shown otherwise (forced panels): what they determine is not repeated."""
    given_dims = [_column(k, k) for k in given]
    x_dims = [_column(x_key, x_key)] if x_key else []
    chosen: list[Dim] = []

    def consider(d: Dim, known: list[Dim]) -> None:
        if len({_hashable(d.get(r)) for r in rows}) > 1 and not _determined(rows, d, known + chosen):
            chosen.append(d)

    for k, lab in COLUMN_DIMS:
        if k != x_key and k not in given:
            consider(_column(k, lab), given_dims)
    for k in sorted({k for r in rows for k in (r.get("_flat") or {})}):
        if not k.startswith(_NOT_SETTINGS):
            consider(_config(k), given_dims + x_dims)
    return chosen


@dataclass
class Layout:
    """How one figure shows the varied settings: ``colour`` and ``style`` (marker / line style) dims, and the
    dims that split the runs into panels. Style indices are fixed over the whole figure."""

    colour: Optional[Dim]
    style: Optional[Dim]
    panels: list[Dim]
    colour_values: list[str]
    style_values: list[str]
    along_x: list[Dim] = field(default_factory=list)  # settings one-to-one with x: named at their x, not styled

    @property
    def dims(self) -> list[Dim]:
        return [d for d in (self.colour, self.style) if d is not None] + self.panels + self.along_x

    def colour_index(self, row: dict) -> int:
        return self.colour_values.index(self.colour.text(row)) if self.colour else 0

    def style_index(self, row: dict) -> int:
        return self.style_values.index(self.style.text(row)) if self.style else 0

    def panel_key(self, row: dict) -> tuple[str, ...]:
        return tuple(d.text(row) for d in self.panels)

    def panel_title(self, key: tuple[str, ...]) -> str:
        return ", ".join(f"{d.label} {v}" for d, v in zip(self.panels, key))

    def group_key(self, row: dict) -> tuple[str, ...]:
        """Runs with the same group key differ in nothing the sweep varied but the plotted x."""
        return tuple(d.text(row) for d in self.dims)

    def series_label(self, row: dict) -> str:
        return " | ".join(d.text(row) for d in (self.colour, self.style) if d is not None) or "all runs"

    def varied_text(self) -> str:
        return ", ".join([d.label for d in self.dims if d not in self.along_x]
                         + [f"{d.label} (named above its x)" for d in self.along_x])


def _sorted_values(rows: list[dict], dim: Dim) -> list[str]:
    vals = {dim.text(r): dim.get(r) for r in rows}
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals.values())
    return sorted(vals, key=(lambda t: vals[t]) if numeric else str)


def layout(rows: list[dict], x_key: Optional[str] = None, force_panels: tuple[str, ...] = ()) -> Layout:
    """Colour for the first varied setting, marker / line style for the second, a panel per combination of
    the rest. ``force_panels``: row keys that always split panels when they vary (e.g. the clock: times on
    different clocks never share an axis)."""
    forced = tuple(k for k in force_panels if len({r.get(k) for r in rows}) > 1)
    dims = varied(rows, x_key, forced)
    along_x = []
    if x_key:  # e.g. network presets on a bandwidth axis: each preset is one bandwidth, and the reverse
        x = _column(x_key, x_key)
        along_x = [d for d in dims if _determined(rows, d, [x]) and _determined(rows, x, [d])]
        dims = [d for d in dims if d not in along_x]
    colour = dims[0] if dims else None
    style = dims[1] if len(dims) > 1 else None
    return Layout(colour, style, dims[2:] + [_column(k, k) for k in forced],
                  _sorted_values(rows, colour) if colour else [], _sorted_values(rows, style) if style else [],
                  along_x)

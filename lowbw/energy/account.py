"""Energy accounting: a run's timeline -> joules per token and where they went.

Per node, over the run's span (the same span for every node: a node is powered while the run lasts)::

    E_node = P_busy * t_busy + P_idle * t_idle + E_network(attributed to the node)

``t_busy`` is the union of the rank's compute events (forward, backward, codec work, optimizer) inside
the span, ``t_idle = span - t_busy`` (bubbles and waiting on links). The network part comes from a
:class:`~lowbw.energy.network.NetworkEnergyModel`. Energy follows the clock: with a virtual-clock
timeline the times are event times, with a wall-clock timeline they are measured times.

Every figure in an :class:`EnergyReport` has a label: the model's figures are "modelled"; figures read
from hardware counters (see :mod:`lowbw.energy.meters`) are kept apart as ``measured_j`` and labelled
"measured". A measured figure covers the metered device (GPU or CPU package), busy and idle, not the
network: compare it with ``device_j`` (compute + idle).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lowbw.energy.meters import MEASURED, MODELLED, Measurement
from lowbw.energy.network import LinkEnergy, NetworkEnergyModel, make_network_model
from lowbw.energy.profiles import HardwareProfile, profiles_for_ranks
from lowbw.metrics.timeline import COMPUTE, Timeline

_EPS = 1e-9


@dataclass
class NodeEnergy:
    """One rank's energy. ``compute_j``, ``idle_j``, ``network_j`` are modelled; ``measured_j`` is
    read from a meter (None when nothing measured this rank)."""

    rank: int
    hardware: str
    busy_s: float
    idle_s: float
    compute_j: float
    idle_j: float
    network_j: float
    measured_j: float | None = None
    meter: str = "none"
    scope: str = ""

    @property
    def device_j(self) -> float:
        return self.compute_j + self.idle_j

    @property
    def total_j(self) -> float:
        return self.compute_j + self.idle_j + self.network_j

    @property
    def source(self) -> dict[str, str]:
        labels = {"compute_j": MODELLED, "idle_j": MODELLED, "network_j": MODELLED, "device_j": MODELLED,
                  "total_j": MODELLED}
        if self.measured_j is not None:
            labels["measured_j"] = MEASURED
        return labels

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "hardware": self.hardware, "busy_s": self.busy_s, "idle_s": self.idle_s,
                "compute_j": self.compute_j, "idle_j": self.idle_j, "network_j": self.network_j,
                "device_j": self.device_j, "total_j": self.total_j, "measured_j": self.measured_j,
                "meter": self.meter, "scope": self.scope, "source": self.source}


@dataclass
class EnergyReport:
    clock: str  # "virtual" | "wall"
    span_s: float
    tokens: int
    nodes: list[NodeEnergy]
    links: list[LinkEnergy] = field(default_factory=list)
    network_model: dict[str, Any] = field(default_factory=dict)
    hardware: dict[str, dict[str, Any]] = field(default_factory=dict)  # profile name -> numbers + sources

    # ---- modelled totals
    @property
    def compute_j(self) -> float:
        return sum(n.compute_j for n in self.nodes)

    @property
    def idle_j(self) -> float:
        return sum(n.idle_j for n in self.nodes)

    @property
    def network_j(self) -> float:
        return sum(link.total_j for link in self.links)

    @property
    def network_fixed_j(self) -> float:
        """The network part that grows with the run's duration: power of equipment held for the run."""
        return sum(link.fixed_j for link in self.links)

    @property
    def network_per_bit_j(self) -> float:
        """The network part that grows with the bytes sent."""
        return sum(link.marginal_j for link in self.links)

    @property
    def device_j(self) -> float:
        return self.compute_j + self.idle_j

    @property
    def total_j(self) -> float:
        return self.compute_j + self.idle_j + self.network_j

    def per_token(self, joules: float | None) -> float | None:
        if joules is None or self.tokens <= 0:
            return None
        return joules / self.tokens

    @property
    def j_per_token(self) -> float | None:
        return self.per_token(self.total_j)

    @property
    def idle_fraction(self) -> float:
        """Idle node-seconds over all node-seconds of the span."""
        total = self.span_s * len(self.nodes)
        return sum(n.idle_s for n in self.nodes) / total if total > 0 else 0.0

    # ---- measured totals: never mixed with the modelled ones
    @property
    def measured_j(self) -> float | None:
        """Sum of measured device energy, or None unless every rank was measured. Ranks sharing one
        counter (same ``scope``, e.g. two ranks on one CPU package) are counted once (their largest
        reading)."""
        if not self.nodes or any(n.measured_j is None for n in self.nodes):
            return None
        by_scope: dict[str, float] = {}
        for n in self.nodes:
            key = n.scope or f"rank{n.rank}"
            by_scope[key] = max(by_scope.get(key, 0.0), n.measured_j)
        return sum(by_scope.values())

    @property
    def measured_j_per_token(self) -> float | None:
        return self.per_token(self.measured_j)

    @property
    def source(self) -> dict[str, str]:
        """The label of every total in :meth:`to_dict`."""
        labels = {k: MODELLED for k in ("compute_j", "idle_j", "network_j", "network_fixed_j", "network_per_bit_j",
                                        "device_j", "total_j", "j_per_token")}
        if self.measured_j is not None:
            labels["measured_j"] = MEASURED
            labels["measured_j_per_token"] = MEASURED
        return labels

    @property
    def label(self) -> str:
        """"measured" when every rank's device energy was measured, else "modelled"."""
        return MEASURED if self.measured_j is not None else MODELLED

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (for summary.json)."""
        return {
            "clock": self.clock, "span_s": self.span_s, "tokens": self.tokens,
            "total_j": self.total_j, "j_per_token": self.j_per_token,
            "compute_j": self.compute_j, "idle_j": self.idle_j, "network_j": self.network_j,
            "network_fixed_j": self.network_fixed_j, "network_per_bit_j": self.network_per_bit_j,
            "device_j": self.device_j, "idle_fraction": self.idle_fraction,
            "measured_j": self.measured_j, "measured_j_per_token": self.measured_j_per_token,
            "label": self.label, "source": self.source,
            "nodes": [n.to_dict() for n in self.nodes],
            "links": [{"a": lk.a, "b": lk.b, "bytes_ab": lk.bytes_ab, "bytes_ba": lk.bytes_ba,
                       "active_s": lk.active_s, "fixed_j": lk.fixed_j, "marginal_j": lk.marginal_j,
                       "total_j": lk.total_j, "source": MODELLED} for lk in self.links],
            "network_model": self.network_model, "hardware": self.hardware,
        }

    def scalars(self, prefix: str = "energy/") -> dict[str, float]:
        """Flat name -> value for TensorBoard. Measured values appear only when measured."""
        out = {f"{prefix}{k}_modelled": v for k, v in (
            ("total_j", self.total_j), ("compute_j", self.compute_j), ("idle_j", self.idle_j),
            ("network_j", self.network_j), ("network_fixed_j", self.network_fixed_j),
            ("network_per_bit_j", self.network_per_bit_j))}
        if self.j_per_token is not None:
            out[f"{prefix}j_per_token_modelled"] = self.j_per_token
        if self.measured_j is not None:
            out[f"{prefix}device_j_measured"] = self.measured_j
            if self.measured_j_per_token is not None:
                out[f"{prefix}device_j_per_token_measured"] = self.measured_j_per_token
        for n in self.nodes:
            p = f"{prefix}rank{n.rank}/"
            out[p + "compute_j_modelled"] = n.compute_j
            out[p + "idle_j_modelled"] = n.idle_j
            out[p + "network_j_modelled"] = n.network_j
            if n.measured_j is not None:
                out[p + "device_j_measured"] = n.measured_j
        return out

    def summary(self) -> str:
        """Console lines; every number says whether it is modelled or measured."""
        tot = self.total_j or 1.0
        jpt = self.j_per_token
        nm = self.network_model.get("model", "?")
        lines = [
            f"energy [modelled; {self.clock} clock; network model '{nm}']: {self.total_j:.4g} J total"
            + (f", {jpt:.4g} J/token" if jpt is not None else "") + f" over {self.span_s:.4g} s",
            f"  compute {self.compute_j:.4g} J ({100 * self.compute_j / tot:.1f}%) | idle {self.idle_j:.4g} J "
            f"({100 * self.idle_j / tot:.1f}%) | network {self.network_j:.4g} J ({100 * self.network_j / tot:.1f}%)",
            f"  network = {self.network_fixed_j:.4g} J fixed (equipment powered for the run) + "
            f"{self.network_per_bit_j:.4g} J per bit sent",
        ]
        for n in self.nodes:
            s = (f"  rank {n.rank} [{n.hardware}]: busy {n.busy_s:.4g} s, idle {n.idle_s:.4g} s -> "
                 f"compute {n.compute_j:.4g} J, idle {n.idle_j:.4g} J, network {n.network_j:.4g} J (modelled)")
            if n.measured_j is not None:
                s += f"; device {n.measured_j:.4g} J (measured, {n.meter} {n.scope})"
            lines.append(s)
        if self.measured_j is not None:
            mpt = self.measured_j_per_token
            lines.append(f"  measured device energy: {self.measured_j:.4g} J"
                         + (f", {mpt:.4g} J/token" if mpt is not None else "")
                         + f" (measured; compare with modelled device energy {self.device_j:.4g} J)")
        elif any(n.measured_j is not None for n in self.nodes):
            ranks = [n.rank for n in self.nodes if n.measured_j is not None]
            lines.append(f"  measured: only ranks {ranks}; no measured total (the totals above are modelled)")
        else:
            lines.append("  measured: none for this run (no energy counter read): all figures are modelled")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------- arithmetic
def union_length(intervals: Sequence[tuple[float, float]], lo: float = float("-inf"),
                 hi: float = float("inf")) -> float:
    """Length of the union of ``intervals`` clipped to [lo, hi] (overlaps counted once)."""
    clipped = sorted((max(a, lo), min(b, hi)) for a, b in intervals)
    total, cur_a, cur_b = 0.0, None, None
    for a, b in clipped:
        if b <= a:
            continue
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        total += cur_b - cur_a
    return total


@dataclass(frozen=True)
class TimelineUsage:
    """What the energy model needs from a timeline."""

    span: tuple[float, float]
    busy_s: list[float]  # per rank
    link_bytes: dict[tuple[int, int], int]  # (src, dst) -> bytes sent
    link_busy_s: dict[tuple[int, int], float]  # unordered (a, b), a < b -> seconds a send was in flight

    @property
    def span_s(self) -> float:
        return self.span[1] - self.span[0]


def timeline_usage(timeline: Timeline, span: tuple[float, float] | None = None) -> TimelineUsage:
    """Busy seconds per rank, bytes per link and link busy time from a :class:`Timeline`.

    ``span`` defaults to (earliest event start, latest event end) over all ranks. Only sends count
    bytes (a receive is the same bytes seen from the other end). Link busy time is the union of send
    events in either direction; it is only as good as the send events' durations -- and the executor
    and the player record sends as instants, so on their timelines it is 0 (a known defect of
    ``energy.power.mode=busy``, docs/energy.md).
    """
    if span is None:
        if timeline.events:
            span = (min(e.start for e in timeline.events), max(e.end for e in timeline.events))
        else:
            span = (0.0, 0.0)
    lo, hi = span
    if hi < lo:
        raise ValueError(f"span end {hi} before start {lo}")
    compute: dict[int, list[tuple[float, float]]] = {r: [] for r in range(timeline.n_ranks)}
    sends: dict[tuple[int, int], list[tuple[float, float]]] = {}
    link_bytes: dict[tuple[int, int], int] = {}
    for e in timeline.events:
        if not 0 <= e.rank < timeline.n_ranks:
            raise ValueError(f"event on rank {e.rank} but the timeline has {timeline.n_ranks} ranks")
        if e.kind in COMPUTE:
            compute[e.rank].append((e.start, e.end))
        elif e.kind == "send":
            if e.peer < 0:
                raise ValueError(f"send event without a peer on rank {e.rank}: {e}")
            link_bytes[(e.rank, e.peer)] = link_bytes.get((e.rank, e.peer), 0) + int(e.nbytes)
            sends.setdefault((min(e.rank, e.peer), max(e.rank, e.peer)), []).append((e.start, e.end))
    busy = [union_length(compute[r], lo, hi) for r in range(timeline.n_ranks)]
    link_busy = {k: union_length(v, lo, hi) for k, v in sends.items()}
    return TimelineUsage((lo, hi), busy, link_bytes, link_busy)


def _measurements(measured: Any, n_ranks: int) -> list[Measurement | None]:
    if measured is None:
        return [None] * n_ranks
    if isinstance(measured, Mapping):
        out = [measured.get(r) for r in range(n_ranks)]
    else:
        out = list(measured)
        if len(out) != n_ranks:
            raise ValueError(f"measured has {len(out)} entries for {n_ranks} ranks")
    for m in out:
        if m is not None and not isinstance(m, Measurement):
            raise TypeError(f"measured entries must be meters.Measurement or None, got {type(m).__name__}")
    return out


def account(
    busy_s: Sequence[float],
    span_s: float,
    profiles: Any,
    network: Any = "intensity",
    tokens: int = 0,
    link_bytes: Mapping[tuple[int, int], int] | None = None,
    link_busy_s: Mapping[tuple[int, int], float] | None = None,
    measured: Sequence[Measurement | None] | Mapping[int, Measurement] | None = None,
    clock: str = "virtual",
) -> EnergyReport:
    """The energy of a run from per-rank busy seconds, the span and bytes per link.

    ``profiles``: anything :func:`~lowbw.energy.profiles.profiles_for_ranks` takes (a name, a profile,
    a list, the ``hardware`` config node). ``network``: anything
    :func:`~lowbw.energy.network.make_network_model` takes (a name, a model, the ``energy`` node).
    ``tokens``: tokens trained during the span (for J/token). ``link_bytes[(src, dst)]``: bytes sent.
    ``link_busy_s[(a, b)]``: seconds the link was transferring (power model, ``mode: busy``).
    ``measured``: per-rank :class:`~lowbw.energy.meters.Measurement` (or None), from the meters.
    """
    n = len(busy_s)
    if n == 0:
        raise ValueError("no ranks")
    if span_s < 0:
        raise ValueError(f"span_s must be >= 0, got {span_s}")
    profs: list[HardwareProfile] = profiles_for_ranks(profiles, n)
    model: NetworkEnergyModel = make_network_model(network)
    meas = _measurements(measured, n)
    links = model.energy(dict(link_bytes or {}), span_s, link_busy_s)
    for lk in links:
        if max(lk.a, lk.b) >= n:
            raise ValueError(f"link ({lk.a}, {lk.b}) names a rank outside 0..{n - 1}")
    net_per_rank = [0.0] * n
    for lk in links:
        for r, j in lk.per_rank_j.items():
            net_per_rank[r] += j
    nodes = []
    for r in range(n):
        b = float(busy_s[r])
        if b < 0 or b > span_s * (1 + _EPS) + _EPS:
            raise ValueError(f"rank {r}: busy {b} s outside [0, span {span_s} s]")
        b = min(b, span_s)
        idle = span_s - b
        p = profs[r]
        m = meas[r]
        nodes.append(NodeEnergy(
            rank=r, hardware=p.name, busy_s=b, idle_s=idle,
            compute_j=p.busy_power_w * b, idle_j=p.idle_power_w * idle, network_j=net_per_rank[r],
            measured_j=None if m is None else m.joules,
            meter="none" if m is None or m.joules is None else m.meter,
            scope="" if m is None or m.joules is None else m.scope,
        ))
    return EnergyReport(
        clock=clock, span_s=float(span_s), tokens=int(tokens), nodes=nodes, links=links,
        network_model=model.describe(),
        hardware={p.name: p.to_dict() for p in profs},
    )


def account_timeline(
    timeline: Timeline,
    profiles: Any,
    network: Any = "intensity",
    tokens: int = 0,
    span: tuple[float, float] | None = None,
    measured: Sequence[Measurement | None] | Mapping[int, Measurement] | None = None,
) -> EnergyReport:
    """:func:`account` on a :class:`~lowbw.metrics.timeline.Timeline` (either clock).

    ``span`` defaults to (earliest event start, latest event end) over all ranks; pass the run's own
    window (e.g. ``(0.0, run_seconds)`` on the wall clock) to charge setup and tail idle time too.
    """
    u = timeline_usage(timeline, span)
    return account(u.busy_s, u.span_s, profiles, network, tokens, u.link_bytes, u.link_busy_s,
                   measured, clock=timeline.clock)

"""Link conditions that change over a run: outages, bandwidth over time, packet loss.

- Outage: the link ``src->dst`` (or every link, ``*``) is down from ``start_s`` to ``end_s`` on the
  run clock. A message that would start onto the link inside the window waits until it ends; a
  message already on the wire when it starts completes (the window models a route flap between
  messages, not a cut mid-transfer).
- Bandwidth over time: a trace file (CSV with a header ``time_s,factor`` -- a multiplier of every
  link's bandwidth -- or ``time_s,mbps`` -- an absolute cap), piecewise constant from each row's time;
  or a seeded random walk of the multiplier. A message is sent at the bandwidth in force when it starts.
- Packet loss turns into a TCP throughput ceiling by the Mathis formula (Mathis, Semke, Mahdavi &
  Ott 1997, "The macroscopic behavior of the TCP congestion avoidance algorithm", CCR 27(3)):
  ``rate <= (MSS / RTT) * C / sqrt(p)`` with ``C = sqrt(3/2)``, RTT twice the pair's one-way latency.
"""

from __future__ import annotations

import bisect
import csv
import io
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lowbw.errors import ConfigError

MATHIS_C = math.sqrt(1.5)  # Mathis et al. 1997, periodic-loss model constant
MAX_TRACE_BYTES = 64 * 2**20  # a bandwidth trace every rank reads and keeps (about 3 million rows)


def mathis_ceiling_bps(loss_rate: float, rtt_s: float, mss_bytes: int) -> float:
    """TCP throughput ceiling in bit/s at packet loss ``loss_rate`` and round trip ``rtt_s``."""
    if loss_rate <= 0 or rtt_s <= 0:
        return math.inf
    return 8.0 * mss_bytes / rtt_s * MATHIS_C / math.sqrt(loss_rate)


@dataclass(frozen=True)
class Outage:
    src: Optional[int]  # None: any sender
    dst: Optional[int]  # None: any receiver
    start_s: float
    end_s: float

    def covers(self, src: int, dst: int, t: float) -> bool:
        return (self.src in (None, src)) and (self.dst in (None, dst)) and self.start_s <= t < self.end_s


@dataclass
class Conditions:
    outages: list[Outage] = field(default_factory=list)
    trace_t: list[float] = field(default_factory=list)  # s, run clock, ascending
    trace_v: list[float] = field(default_factory=list)  # factor or bit/s, per trace_kind
    trace_kind: str = "factor"  # "factor" | "bps"
    loss_rate: float = 0.0
    mss_bytes: int = 1460

    @property
    def active(self) -> bool:
        return bool(self.outages or self.trace_t or self.loss_rate > 0)

    def start_time(self, src: int, dst: int, t: float) -> float:
        """Earliest time >= t at which a message may start onto link src->dst."""
        moved = True
        while moved:  # windows may overlap or follow each other
            moved = False
            for o in self.outages:
                if o.covers(src, dst, t):
                    t, moved = o.end_s, True
        return t

    def bandwidth_bps(self, base_bps: float, one_way_latency_s: float, t: float) -> float:
        bw = min(base_bps, mathis_ceiling_bps(self.loss_rate, 2 * one_way_latency_s, self.mss_bytes))
        if self.trace_t:
            i = bisect.bisect_right(self.trace_t, t) - 1
            if i >= 0:
                bw = bw * self.trace_v[i] if self.trace_kind == "factor" else min(bw, self.trace_v[i])
        return bw


def _parse_link(text: str, n: int) -> tuple[Optional[int], Optional[int]]:
    text = str(text).strip()
    if text == "*":
        return None, None
    try:
        a, b = (int(x) for x in text.split("->"))
    except ValueError:
        raise ConfigError(f"faults.outages link {text!r}: write 'src->dst' (ranks) or '*'") from None
    if not (0 <= a < n and 0 <= b < n) or a == b:
        raise ConfigError(f"faults.outages link {text!r}: ranks must be two different ranks in 0..{n - 1}")
    return a, b


def read_trace(path: str) -> tuple[list[float], list[float], str]:
    """Read a bandwidth trace; every bad row is an error naming the file and line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"faults.bandwidth_trace={path!r} does not exist; give a CSV file with a header time_s,factor or time_s,mbps")
    if p.stat().st_size > MAX_TRACE_BYTES:
        raise ConfigError(f"faults.bandwidth_trace={path!r} is {p.stat().st_size:,} bytes, more than "
                          f"{MAX_TRACE_BYTES:,}; every rank holds the whole trace: thin it out")
    raw = p.read_bytes()
    if b"\0" in raw:
        raise ConfigError(f"faults.bandwidth_trace={path!r} looks binary (it holds NUL bytes); give a CSV text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"faults.bandwidth_trace={path!r} is not UTF-8 text (bad byte at offset {e.start}); "
                          "give a CSV text file") from None
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows or [c.strip() for c in rows[0]] not in (["time_s", "factor"], ["time_s", "mbps"]):
        raise ConfigError(f"faults.bandwidth_trace={path!r}: the first line must be the header 'time_s,factor' or 'time_s,mbps'")
    kind = "factor" if rows[0][1].strip() == "factor" else "bps"
    ts, vs = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        try:
            t, v = float(row[0]), float(row[1])
            if len(row) != 2 or not math.isfinite(t) or not math.isfinite(v):
                raise ValueError
        except (ValueError, IndexError):
            raise ConfigError(f"faults.bandwidth_trace={path!r} line {line}: expected two numbers, got {','.join(row)!r}") from None
        if v <= 0 or t < 0 or (ts and t <= ts[-1]):
            raise ConfigError(f"faults.bandwidth_trace={path!r} line {line}: times must increase from >= 0 and values be > 0")
        ts.append(t)
        vs.append(v if kind == "factor" else v * 1e6)
    if not ts:
        raise ConfigError(f"faults.bandwidth_trace={path!r} has a header but no rows")
    return ts, vs, kind


def random_walk(seed: int, interval_s: float, sigma: float, lo: float, hi: float, horizon_s: float) -> tuple[list[float], list[float]]:
    """A seeded multiplicative random walk of the bandwidth factor, clipped to [lo, hi]."""
    rng = random.Random(seed)
    ts, vs, f, t = [], [], 1.0, 0.0
    while t <= horizon_s:
        ts.append(t)
        vs.append(f)
        f = min(hi, max(lo, f * math.exp(rng.gauss(0.0, sigma))))
        t += interval_s
    return ts, vs


def conditions_from_config(faults: Any, net: Any, n: int) -> Conditions:
    """Build (and check) the conditions of a run from its ``faults`` and ``net`` config nodes."""
    outages = []
    for o in faults.outages or []:
        src, dst = _parse_link(o.link, n)
        if not (0 <= o.start_s < o.end_s) or not math.isfinite(o.end_s):
            raise ConfigError(f"faults.outages: window [{o.start_s}, {o.end_s}) s must have 0 <= start < end < inf")
        outages.append(Outage(src, dst, float(o.start_s), float(o.end_s)))
    cond = Conditions(outages=outages, loss_rate=float(net.loss_rate), mss_bytes=int(net.mss_bytes))
    if not 0 <= cond.loss_rate < 1:
        raise ConfigError(f"net.loss_rate={net.loss_rate} must lie in [0, 1)")
    if cond.mss_bytes <= 0:
        raise ConfigError(f"net.mss_bytes={net.mss_bytes} must be > 0")
    walk = faults.bandwidth_walk if getattr(faults.bandwidth_walk, "enabled", False) else None
    if faults.bandwidth_trace and walk is not None:
        raise ConfigError("faults.bandwidth_trace and faults.bandwidth_walk are exclusive; set one of them")
    if faults.bandwidth_trace:
        cond.trace_t, cond.trace_v, cond.trace_kind = read_trace(faults.bandwidth_trace)
    elif walk is not None:
        w = walk
        if not (w.interval_s > 0 and w.sigma >= 0 and 0 < w.min_factor <= 1 <= w.max_factor and w.horizon_s > 0):
            raise ConfigError("faults.bandwidth_walk needs interval_s > 0, sigma >= 0, 0 < min_factor <= 1 <= max_factor, horizon_s > 0")
        cond.trace_t, cond.trace_v = random_walk(w.seed, w.interval_s, w.sigma, w.min_factor, w.max_factor, w.horizon_s)
    return cond

"""Who is linked to whom, how fast: a network preset resolved for a given number of ranks.

Each directed pair (i, j) gets a one-way latency, a mean jitter and a bandwidth; each node an
uplink and a downlink. The bandwidth of pair (i, j) is min(uplink_i, downlink_j, pair cap),
the bottleneck of a single flow. See docs/networks.md for the presets and their sources.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from lowbw.errors import ConfigError

MBIT = 1e6  # bits per Mbit/s unit (network convention, SI)
MAX_LATENCY_MS = 60_000.0  # a minute one way: beyond any terrestrial or geostationary link (lowbw.limits)
MIN_BANDWIDTH_MBPS = 1e-3  # 1 kbit/s (lowbw.limits)


def link_key(src: int, dst: int) -> str:
    """How a directed link between ranks is named in files and reports: ``"src->dst"``."""
    return f"{src}->{dst}"


def parse_link_key(key: str) -> tuple[int, int]:
    """Invert :func:`link_key`."""
    a, b = key.split("->")
    return int(a), int(b)


def _get(spec: Any, key: str) -> Any:
    return spec.get(key) if hasattr(spec, "get") else getattr(spec, key, None)


@dataclass(frozen=True)
class PairLink:
    latency_s: float  # one-way
    jitter_s: float  # mean of the exponential extra delay
    bandwidth_bps: float  # bits per second of a single flow on this pair (may be inf)


@dataclass(frozen=True)
class Framing:
    """Bytes a message of ``b`` payload bytes occupies on a link (``net.framing``).

    ``per_segment_bytes = 0`` charges the payload alone (what WAN benchmarks and cloud bills count);
    otherwise the message is cut into ``ceil(b / mss_bytes)`` TCP segments and each carries
    ``per_segment_bytes`` of headers and framing (docs/networks.md, "Line rate")."""

    mss_bytes: int = 1460
    per_segment_bytes: int = 0

    def wire_bytes(self, nbytes: int) -> int:
        if not self.per_segment_bytes:
            return nbytes
        return nbytes + self.per_segment_bytes * -(-nbytes // self.mss_bytes)


def framing_from_config(net: Any) -> Framing:
    """``net.framing``: ``payload`` (the default) or ``line`` (TCP/IP headers and Ethernet framing per segment)."""
    how = getattr(net, "framing", "payload")
    if how == "payload":
        return Framing(int(net.mss_bytes), 0)
    if how != "line":
        raise ConfigError(f"net.framing={how!r}: use payload (8 bits a payload byte) or line (plus TCP/IP and "
                          "Ethernet framing per segment)")
    sizes = {k: getattr(net, k) for k in ("mss_bytes", "tcp_ip_header_bytes", "ethernet_overhead_bytes")}
    for k, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if k == "mss_bytes" else 0):
            raise ConfigError(f"net.{k}={v!r} must be a whole number of bytes ({'> 0' if k == 'mss_bytes' else '>= 0'})")
    return Framing(sizes["mss_bytes"], sizes["tcp_ip_header_bytes"] + sizes["ethernet_overhead_bytes"])


@dataclass(frozen=True)
class Topology:
    n: int
    semantics: str  # "pipelined" | "serialized"
    uplink_bps: tuple[float, ...]
    downlink_bps: tuple[float, ...]
    pairs: dict[tuple[int, int], PairLink]
    emulate: bool = True
    framing: Framing = Framing()  # what a message costs on the wire (default: its payload)
    duplex_efficiency: float = 1.0  # rate kept by each direction of a pair while both carry data (lowbw.net.link)

    def link(self, src: int, dst: int) -> PairLink:
        return self.pairs[(src, dst)]

    @staticmethod
    def from_config(net: Any, n: int, seed: int = 0) -> "Topology":
        """Resolve a `net` config node (NetConfig or DictConfig) for n ranks; raise ConfigError on bad values."""
        name = getattr(net, "name", "?")

        def check_latency(v: float, what: str) -> float:
            if v is None or math.isnan(v) or v < 0 or v > MAX_LATENCY_MS:
                raise ConfigError(f"net.{what}={v} (preset {name!r}): latency must be a number in [0, 60,000] ms "
                                  "(on the wall clock the run would wait that long for real)")
            return v / 1e3

        def check_bw(v: float, what: str) -> float:
            if v is None or math.isnan(v) or v < MIN_BANDWIDTH_MBPS:
                raise ConfigError(f"net.{what}={v} (preset {name!r}): bandwidth must be at least 0.001 Mbit/s "
                                  "(inf allowed): below 1 kbit/s a step's messages take hours")
            return v * MBIT

        if net.semantics not in ("pipelined", "serialized"):
            raise ConfigError(f"net.semantics={net.semantics!r}: use pipelined or serialized")
        latency = check_latency(net.latency_ms, "latency_ms")
        jitter = check_latency(net.jitter_ms, "jitter_ms")
        up = check_bw(net.uplink_mbps, "uplink_mbps")
        down = check_bw(net.downlink_mbps, "downlink_mbps")
        regions = list(net.regions or [])
        pair_cfg = dict(net.pairs or {})
        overrides: dict[tuple[str, str], Any] = {}
        for key, spec in pair_cfg.items():
            if "->" in key:
                a, b = key.split("->", 1)
                keys = [(a.strip(), b.strip())]
            elif "-" in key:
                a, b = key.split("-", 1)
                keys = [(a.strip(), b.strip()), (b.strip(), a.strip())]
            else:
                raise ConfigError(f"net.pairs key {key!r}: write 'a-b' (both directions) or 'a->b' (one)")
            for k in keys:
                for r in k:
                    if r not in regions:
                        raise ConfigError(f"net.pairs key {key!r} names region {r!r}, not in net.regions={regions}")
                overrides[k] = spec
        pairs: dict[tuple[int, int], PairLink] = {}
        rnd = getattr(net, "random", None)
        if rnd is not None:
            lo_l, hi_l = [check_latency(v, "random.latency_ms") for v in rnd.latency_ms]
            lo_b, hi_b = [check_bw(v, "random.bandwidth_mbps") for v in rnd.bandwidth_mbps]
            if lo_l > hi_l or lo_b > hi_b or math.isinf(hi_b):
                raise ConfigError(f"net.random ranges must be finite [lo, hi] with lo <= hi (preset {name!r})")
            rng = random.Random(int(rnd.seed))
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                lat, bw = latency, min(up, down)
                if regions:
                    ri, rj = regions[i % len(regions)], regions[j % len(regions)]
                    spec = overrides.get((ri, rj))
                    if spec is not None:
                        p_lat, p_bw = _get(spec, "latency_ms"), _get(spec, "bandwidth_mbps")
                        if p_lat is not None:
                            lat = check_latency(p_lat, f"pairs.{ri}-{rj}.latency_ms")
                        if p_bw is not None:
                            bw = min(bw, check_bw(p_bw, f"pairs.{ri}-{rj}.bandwidth_mbps"))
                if rnd is not None:
                    lat = rng.uniform(lo_l, hi_l)
                    bw = math.exp(rng.uniform(math.log(lo_b), math.log(hi_b)))
                pairs[(i, j)] = PairLink(lat, jitter, bw)
        if rnd is not None:  # per-pair draws replace the node caps
            up = down = math.inf
        backend = getattr(net, "backend", "emulated")
        if backend not in ("emulated", "kernel"):
            raise ConfigError(f"net.backend={backend!r}: use emulated (lowbw's link model) or kernel (namespaces "
                              "shaped by tc)")
        emulate = bool(getattr(net, "emulate", True)) and backend == "emulated"  # the kernel is the network
        duplex = float(getattr(net, "duplex_efficiency", 1.0))
        if not 0 < duplex <= 1:
            raise ConfigError(f"net.duplex_efficiency={duplex} must lie in (0, 1]: the fraction of a pair's rate each "
                              "direction keeps while both carry data (1 = independent directions)")
        return Topology(n, net.semantics, (up,) * n, (down,) * n, pairs, emulate, framing_from_config(net), duplex)

    def describe(self) -> str:
        lat = sorted({round(p.latency_s * 1e3, 3) for p in self.pairs.values()})
        bw = sorted({round(p.bandwidth_bps / MBIT, 3) for p in self.pairs.values()})
        lat_s = f"{lat[0]} ms" if len(lat) == 1 else f"{lat[0]}-{lat[-1]} ms"
        bw_s = f"{bw[0]} Mbit/s" if len(bw) == 1 else f"{bw[0]}-{bw[-1]} Mbit/s"
        return f"one-way latency {lat_s}, pair bandwidth {bw_s}, {self.semantics}"

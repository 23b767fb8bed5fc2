"""Network energy models: what moving bytes between nodes costs, selectable by name.

The literature disagrees on how to charge network energy, and the choice changes conclusions
(docs/energy.md has a worked example), so the model is a setting
(``energy.network=link_class|intensity|power``):

``link_class`` (the default)
    The network preset's own link class (``net.energy`` in configs/net/<preset>.yaml, numbers with
    sources): ``access_power_w`` for each node that exchanged bytes, for as long as the run lasts
    (equipment a node holds for itself: a home router and its access line), plus ``j_per_bit`` for
    every bit sent (equipment shared with other traffic -- a datacenter fabric's NICs, optics and
    switches, an operator's routers and links -- charged by the bits the run puts through it).
    So a datacenter link and home broadband cost different joules, and a slower run costs more
    because the access equipment is powered for longer.

``intensity``
    Energy proportional to bytes, whatever the link: ``E = bytes * kWh/GB`` (``energy=intensity``).
    0.06 kWh/GB, the estimate of Aslan et al. (2018) for the year 2015, which also reports the figure
    halving about every 2 years (``at_year`` extrapolates). Published estimates span 0.0064-136 kWh/GB
    (Coroama & Hilty 2014).

``power``
    Mytton, Lunden & Malmodin (2024) argue network energy is not proportional to data volume:
    equipment draws a near-constant baseline power plus a small marginal cost per bit. Each
    *active link* (an unordered pair of ranks that exchanged at least one byte) draws
    ``link_power_w + capacity_w_per_mbps * capacity_mbps`` for as long as the run lasts
    (``mode: span``, the only mode: the line and its equipment are held by the run whether or not bytes
    flow; a ``busy`` mode is refused, since sends are recorded as instants and no wire time is known), plus
    ``marginal_j_per_bit`` for each bit sent (``energy=power``). Default numbers from Malmodin (2020)
    fixed broadband, as reproduced in Mytton's notebook for the 2024 paper (docs/energy.md says where
    they differ from the paper): per subscription 16.5 W home router (CPE) idle + 1.5 W fixed
    network baseline + 0.03 W per Mbps of line capacity, and 0.02 W per Mbps of traffic (= 2e-8 J/bit);
    a link has two ends: 2 * (16.5 + 1.5) = 36 W, 2 * 0.03 = 0.06 W/Mbps, at 100 Mbps: 42 W.

Attribution to nodes: the per-byte part goes to the sending rank; a link's fixed part is split
equally between its two ends; a node's own fixed power (``link_class``) goes to that node, booked
in equal shares on its active links.

Adding a model: subclass :class:`NetworkEnergyModel`, give it a ``name`` and decorate it with
:func:`register_network_model`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lowbw.config import plain
from lowbw.errors import ConfigError

J_PER_KWH = 3.6e6
BYTES_PER_GB = 1e9  # decimal GB, as in the kWh/GB literature


@dataclass(frozen=True)
class LinkEnergy:
    """Network energy of one unordered pair of ranks ``(a, b)``, ``a < b``."""

    a: int
    b: int
    bytes_ab: int  # bytes sent a -> b
    bytes_ba: int  # bytes sent b -> a
    active_s: float  # seconds the fixed power was charged for
    fixed_j: float
    marginal_j: float
    per_rank_j: dict[int, float] = field(default_factory=dict)

    @property
    def total_j(self) -> float:
        return self.fixed_j + self.marginal_j

    @property
    def nbytes(self) -> int:
        return self.bytes_ab + self.bytes_ba


class NetworkEnergyModel(ABC):
    """Fixed power per active link plus a cost per byte sent; subclasses set the two."""

    name: ClassVar[str] = ""
    #: where the default numbers come from
    source: ClassVar[str] = ""
    #: the config block that holds the parameters, for error messages ("" = energy.<name>)
    params_at: ClassVar[str] = ""

    @abstractmethod
    def joules_per_byte(self) -> float:
        """Marginal energy per byte on the wire (J/B)."""

    def link_power_w(self) -> float:
        """Fixed power of one active link (W); 0 for volume-proportional models."""
        return 0.0

    def node_power_w(self) -> float:
        """Fixed power of each active node (W), charged for the whole span; 0 unless the model
        charges equipment a node holds for itself (``link_class``)."""
        return 0.0

    def active_seconds(self, span_s: float, busy_s: float) -> float:
        """Seconds a link's fixed power is charged, given the run span and its busy time."""
        return span_s

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The model's parameters, for the report."""

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "params": self.params(), "source": self.source,
                "joules_per_byte": self.joules_per_byte(), "link_power_w": self.link_power_w(),
                "node_power_w": self.node_power_w()}

    def bytes_energy_j(self, nbytes: float) -> float:
        return float(nbytes) * self.joules_per_byte()

    def energy(
        self,
        link_bytes: Mapping[tuple[int, int], int],
        span_s: float,
        link_busy_s: Mapping[tuple[int, int], float] | None = None,
    ) -> list[LinkEnergy]:
        """Energy per unordered link.

        ``link_bytes[(src, dst)]`` is bytes sent from ``src`` to ``dst``; ``link_busy_s`` maps an
        unordered pair (either order) to seconds during which the link was transferring, used by
        models whose fixed power is charged only while busy. Links with zero bytes are not active.
        """
        if span_s < 0:
            raise ValueError(f"span_s must be >= 0, got {span_s}")
        pairs: dict[tuple[int, int], list[int]] = {}
        for (src, dst), n in link_bytes.items():
            if src == dst:
                raise ValueError(f"link ({src}, {dst}) sends to itself")
            if n < 0:
                raise ValueError(f"link ({src}, {dst}): negative bytes {n}")
            a, b = min(src, dst), max(src, dst)
            slot = pairs.setdefault((a, b), [0, 0])
            slot[0 if src == a else 1] += int(n)
        busy = {}
        for (x, y), s in (link_busy_s or {}).items():
            key = (min(x, y), max(x, y))
            busy[key] = busy.get(key, 0.0) + float(s)
        active_pairs = {k: v for k, v in sorted(pairs.items()) if sum(v) > 0}
        degree: dict[int, int] = {}  # active links per node: a node's own power is booked in equal shares
        for a, b in active_pairs:
            degree[a] = degree.get(a, 0) + 1
            degree[b] = degree.get(b, 0) + 1
        out = []
        jpb = self.joules_per_byte()
        p_link, p_node = self.link_power_w(), self.node_power_w()
        for (a, b), (ab, ba) in active_pairs.items():
            active = min(span_s, self.active_seconds(span_s, busy.get((a, b), 0.0)))
            node_a, node_b = p_node * span_s / degree[a], p_node * span_s / degree[b]
            link = p_link * active
            m_a, m_b = ab * jpb, ba * jpb
            out.append(LinkEnergy(
                a=a, b=b, bytes_ab=ab, bytes_ba=ba, active_s=active, fixed_j=link + node_a + node_b,
                marginal_j=m_a + m_b, per_rank_j={a: link / 2 + node_a + m_a, b: link / 2 + node_b + m_b},
            ))
        return out


NETWORK_MODELS: dict[str, type[NetworkEnergyModel]] = {}


def register_network_model(cls: type[NetworkEnergyModel]) -> type[NetworkEnergyModel]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a name")
    NETWORK_MODELS[cls.name] = cls
    return cls


@register_network_model
class IntensityModel(NetworkEnergyModel):
    """``E = bytes * kWh/GB``; optional halving-time extrapolation from the estimate's year."""

    name = "intensity"
    source = ("Aslan, Mayers, Koomey & France (2018), J. Ind. Ecol. 22(4): 0.06 kWh/GB for 2015, "
              "halving about every 2 years; published estimates span 0.0064-136 kWh/GB "
              "(Coroama & Hilty 2014)")

    def __init__(self, kwh_per_gb: float = 0.06, year: int = 2015, halving_years: float | None = 2.0,
                 at_year: int | None = None):
        if not isinstance(kwh_per_gb, (int, float)) or not math.isfinite(kwh_per_gb) or kwh_per_gb < 0:
            raise ConfigError(f"energy.intensity.kwh_per_gb must be a finite number >= 0, got {kwh_per_gb}")
        if at_year is not None and not halving_years:
            raise ConfigError("energy.intensity.at_year needs energy.intensity.halving_years")
        if halving_years is not None and not (math.isfinite(halving_years) and halving_years > 0):
            raise ConfigError(f"energy.intensity.halving_years={halving_years} must be a number > 0 (or null)")
        if at_year is not None and abs(at_year - year) > 100:
            raise ConfigError(f"energy.intensity.at_year={at_year} is more than 100 years from year={year}")
        self.kwh_per_gb = float(kwh_per_gb)
        self.year = int(year)
        self.halving_years = None if halving_years is None else float(halving_years)
        self.at_year = None if at_year is None else int(at_year)

    def effective_kwh_per_gb(self) -> float:
        if self.at_year is None:
            return self.kwh_per_gb
        return self.kwh_per_gb * 0.5 ** ((self.at_year - self.year) / self.halving_years)

    def joules_per_byte(self) -> float:
        return self.effective_kwh_per_gb() * J_PER_KWH / BYTES_PER_GB

    def params(self) -> dict[str, Any]:
        return {"kwh_per_gb": self.kwh_per_gb, "year": self.year, "halving_years": self.halving_years,
                "at_year": self.at_year, "effective_kwh_per_gb": self.effective_kwh_per_gb()}


@register_network_model
class PowerModel(NetworkEnergyModel):
    """Fixed power per active link while the run lasts + marginal J per bit."""

    name = "power"
    source = ("Mytton, Lunden & Malmodin (2024), J. Ind. Ecol. 28(4) 966-980 (power model); numbers from "
              "Malmodin (2020, Electronics Goes Green) fixed broadband: 16.5 W CPE idle + 1.5 W network "
              "baseline + 0.03 W/Mbps capacity per subscription, 0.02 W/Mbps of traffic (2e-8 J/bit)")
    MODES = ("span",)

    def __init__(self, link_power_w: float = 36.0, capacity_w_per_mbps: float = 0.06,
                 capacity_mbps: float | None = 100.0, marginal_j_per_bit: float = 2e-8, mode: str = "span"):
        if mode == "busy":  # refused rather than silently charging nothing (docs/energy.md)
            raise ConfigError("energy.power.mode=busy is not available: lowbw records a send as an instant, so no "
                              "link busy time is known and the fixed power would be charged for 0 s; use "
                              "energy.power.mode=span (the link's fixed power over the whole run)")
        if mode not in self.MODES:
            raise ConfigError(f"energy.power.mode={mode!r}: choose one of {self.MODES}")
        values = (link_power_w, capacity_w_per_mbps, marginal_j_per_bit, capacity_mbps or 0.0)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values):
            raise ConfigError("energy.power: powers, capacity and per-bit cost must be finite numbers >= 0")
        self.base_w = float(link_power_w)
        self.capacity_w_per_mbps = float(capacity_w_per_mbps)
        self.capacity_mbps = None if capacity_mbps is None else float(capacity_mbps)
        self.marginal_j_per_bit = float(marginal_j_per_bit)
        self.mode = mode

    def link_power_w(self) -> float:
        return self.base_w + self.capacity_w_per_mbps * (self.capacity_mbps or 0.0)

    def joules_per_byte(self) -> float:
        return 8.0 * self.marginal_j_per_bit

    def active_seconds(self, span_s: float, busy_s: float) -> float:
        return span_s

    def params(self) -> dict[str, Any]:
        return {"link_power_w": self.base_w, "capacity_w_per_mbps": self.capacity_w_per_mbps,
                "capacity_mbps": self.capacity_mbps, "marginal_j_per_bit": self.marginal_j_per_bit,
                "mode": self.mode, "fixed_w_per_link": self.link_power_w()}


@register_network_model
class LinkClassModel(NetworkEnergyModel):
    """The network preset's own link class: access power per active node over the run + J per bit.

    Parameters come from ``net.energy`` of the selected preset (configs/net/<preset>.yaml), where each
    number has its source; ``configs/energy/default.yaml`` points ``energy.link_class`` at that block.
    """

    name = "link_class"
    source = "the network preset's net.energy block (configs/net/<preset>.yaml; sources per number in params)"
    params_at = "net.energy"

    def __init__(self, access_power_w: float, j_per_bit: float, link_class: str = "",
                 sources: Mapping[str, str] | None = None):
        for key, value in (("access_power_w", access_power_w), ("j_per_bit", j_per_bit)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"net.energy.{key}={value!r} must be a finite number >= 0")
        self.access_power_w = float(access_power_w)
        self.j_per_bit = float(j_per_bit)
        self.link_class = str(link_class)
        self.sources = dict(sources or {})

    def node_power_w(self) -> float:
        return self.access_power_w

    def joules_per_byte(self) -> float:
        return 8.0 * self.j_per_bit

    def params(self) -> dict[str, Any]:
        return {"link_class": self.link_class, "access_power_w": self.access_power_w,
                "j_per_bit": self.j_per_bit, "sources": self.sources}


def make_network_model(cfg: Any = "intensity", **overrides: Any) -> NetworkEnergyModel:
    """A network model from a name, a model instance, or the ``energy`` config node.

    ``cfg`` shapes: ``"power"``; ``{"network": "power", "power": {...}, "intensity": {...}, ...}``
    (the ``energy`` group, see configs/energy/default.yaml: the block named after the model holds
    its parameters; for ``link_class`` that block is an interpolation of ``net.energy``); or
    ``{"name": "power", **params}``. ``overrides`` go to the constructor.
    """
    if isinstance(cfg, NetworkEnergyModel):
        return cfg
    cfg = plain(cfg)
    if isinstance(cfg, str):
        name, params = cfg, {}
    elif isinstance(cfg, Mapping) and "network" in cfg:
        name = cfg["network"]
        params = dict(plain(cfg.get(name) or {}))
    elif isinstance(cfg, Mapping) and "name" in cfg:
        name = cfg["name"]
        params = {k: v for k, v in cfg.items() if k != "name"}
    else:
        raise ConfigError(f"energy.network: cannot read {cfg!r}; give a model name such as 'intensity'")
    if name not in NETWORK_MODELS:
        raise ConfigError(f"energy.network={name!r} is not a known model; choose one of {sorted(NETWORK_MODELS)}")
    params.update(overrides)
    cls = NETWORK_MODELS[name]
    try:
        return cls(**params)
    except TypeError as e:
        raise ConfigError(f"{cls.params_at or 'energy.' + name}: bad parameters {sorted(params)} ({e})") from None

"""Energy meters: measured joules where the hardware can give them, and an honest "modelled" otherwise.

A meter measures one window: ``begin()``, optionally ``poll()`` now and then, ``end()`` -> joules or
``None``. :func:`select_meter` picks one for a rank's device:

* ``zeus`` -- NVIDIA GPU energy from NVML's total-energy counter through Zeus
  (``ZeusMonitor.begin_window/end_window``). Zeus is an optional dependency (``pip install
  'lowbw[energy]'``) and is imported only when this meter is probed or built.
* ``rapl`` -- CPU package energy from ``/sys/class/powercap/intel-rapl:<n>/energy_uj`` (top-level
  package zones; sub-zones are parts of the package and would double count). The counter wraps at
  ``max_energy_range_uj``; each wrap between two reads is added back. Call ``poll()`` at least once per
  wrap period (``max_energy_range_uj`` / power: ~45 min at 100 W for a 2^38 uJ range) in long runs.
* ``none`` -- :class:`NullMeter`: returns ``None``; the report labels energy "modelled".

The label follows the number: a meter whose ``end()`` returned ``None`` never yields a "measured"
figure, and :class:`NullMeter` is never "measured". Sources are injectable (``select_meter(...,
sources={...})``) so that the selection logic is tested with fake NVML / RAPL sources.
"""

from __future__ import annotations

import glob
import logging
import os
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lowbw.errors import ConfigError

log = logging.getLogger(__name__)

MEASURED = "measured"
MODELLED = "modelled"
RAPL_ROOT = "/sys/class/powercap"
ZEUS_HINT = "pip install 'lowbw[energy]' (or pip install zeus)"


@dataclass(frozen=True)
class Measurement:
    """One measured window. ``scope`` names what was measured (shared hardware shares a scope)."""

    joules: float | None
    seconds: float
    meter: str  # "zeus", "rapl", "none", ...
    scope: str  # e.g. "nvml:gpu0@host", "rapl:package-0@host"

    @property
    def source(self) -> str:
        return MEASURED if self.joules is not None else MODELLED

    def to_dict(self) -> dict[str, Any]:
        return {"joules": self.joules, "seconds": self.seconds, "meter": self.meter,
                "scope": self.scope, "source": self.source}


class EnergyMeter(ABC):
    """Measure energy over a window: ``begin()``, ``poll()`` (optional), ``end()`` -> J or None."""

    name: str = ""

    def __init__(self) -> None:
        self._t0: float | None = None
        self.last: Measurement | None = None

    @property
    def source(self) -> str:
        """"measured" if this meter reads hardware counters, else "modelled"."""
        return MEASURED

    @property
    def scope(self) -> str:
        return ""

    def begin(self) -> None:
        self._t0 = time.monotonic()
        self._begin()

    def poll(self) -> None:
        """Read counters mid-window (catches RAPL wraparound in long windows). Cheap; optional."""

    def end(self) -> float | None:
        if self._t0 is None:
            raise RuntimeError(f"{type(self).__name__}.end() without begin()")
        joules = self._end()
        seconds = time.monotonic() - self._t0
        self._t0 = None
        self.last = Measurement(None if joules is None else float(joules), seconds, self.name, self.scope)
        return self.last.joules

    def measurement(self) -> Measurement | None:
        """The last finished window, or None before the first ``end()``."""
        return self.last

    @abstractmethod
    def _begin(self) -> None: ...

    @abstractmethod
    def _end(self) -> float | None: ...


class NullMeter(EnergyMeter):
    """Nothing to measure with: every window reads None and the figures stay "modelled"."""

    name = "none"

    def __init__(self, reason: str = "no energy counter available"):
        super().__init__()
        self.reason = reason

    @property
    def source(self) -> str:
        return MODELLED

    def _begin(self) -> None:
        pass

    def _end(self) -> None:
        return None


# --------------------------------------------------------------------------------------------- zeus
def import_zeus_monitor() -> type:
    """``zeus.monitor.ZeusMonitor``, or an ImportError that says how to install it."""
    try:
        from zeus.monitor import ZeusMonitor
    except ImportError as e:
        raise ImportError(f"measured GPU energy needs the optional dependency zeus: {ZEUS_HINT}") from e
    return ZeusMonitor


def _gpu_index(device: str) -> int:
    dev = str(device)
    if ":" in dev:
        return int(dev.split(":", 1)[1])
    return 0


class ZeusMeter(EnergyMeter):
    """GPU energy of one device through Zeus (NVML total-energy counter, Volta or newer).

    ``monitor`` may be given (a ``ZeusMonitor`` or any object with ``begin_window(key)`` and
    ``end_window(key)`` returning something with ``gpu_energy: dict[int, float]``), which is how
    tests inject a fake NVML. Otherwise a ``ZeusMonitor(gpu_indices=[index], cpu_indices=[],
    approx_instant_energy=True)`` is built (short windows would otherwise read 0 between counter
    updates).
    """

    name = "zeus"

    def __init__(self, gpu_index: int = 0, monitor: Any | None = None, key: str = "lowbw",
                 approx_instant_energy: bool = True):
        super().__init__()
        self.gpu_index = int(gpu_index)
        self.key = key
        if monitor is None:
            monitor = import_zeus_monitor()(gpu_indices=[self.gpu_index], cpu_indices=[],
                                            approx_instant_energy=approx_instant_energy)
        self.monitor = monitor

    @property
    def scope(self) -> str:
        return f"nvml:gpu{self.gpu_index}@{socket.gethostname()}"

    def _begin(self) -> None:
        self.monitor.begin_window(self.key)

    def _end(self) -> float | None:
        m = self.monitor.end_window(self.key)
        energy = getattr(m, "gpu_energy", None) or {}
        if self.gpu_index not in energy or energy[self.gpu_index] is None:
            return None
        return float(energy[self.gpu_index])


# --------------------------------------------------------------------------------------------- rapl
@dataclass(frozen=True)
class RaplZone:
    path: str  # .../intel-rapl:0
    name: str  # "package-0"
    max_uj: int  # max_energy_range_uj: the counter wraps past this


def find_rapl_zones(root: str = RAPL_ROOT) -> list[RaplZone]:
    """Readable top-level RAPL zones (``intel-rapl:<n>``, usually one per CPU package)."""
    zones = []
    for path in sorted(glob.glob(os.path.join(root, "intel-rapl:*"))):
        base = os.path.basename(path)
        if base.count(":") != 1:  # intel-rapl:0:1 is a sub-zone of intel-rapl:0
            continue
        try:
            with open(os.path.join(path, "energy_uj")) as f:
                int(f.read().strip())
            with open(os.path.join(path, "max_energy_range_uj")) as f:
                max_uj = int(f.read().strip())
        except (OSError, ValueError):  # not readable (root-only since 2020 on many kernels) or missing
            continue
        try:
            with open(os.path.join(path, "name")) as f:
                name = f.read().strip()
        except OSError:
            name = base
        zones.append(RaplZone(path, name, max_uj))
    return zones


class RaplMeter(EnergyMeter):
    """CPU package energy from the powercap RAPL counters, with wraparound handled."""

    name = "rapl"

    def __init__(self, zones: list[RaplZone] | None = None, root: str = RAPL_ROOT):
        super().__init__()
        self.zones = find_rapl_zones(root) if zones is None else list(zones)
        if not self.zones:
            raise RuntimeError(f"no readable RAPL zones under {root}")
        self._prev: list[int] = []
        self._acc_uj = 0

    @property
    def scope(self) -> str:
        return "rapl:" + ",".join(z.name for z in self.zones) + "@" + socket.gethostname()

    def _read(self) -> list[int]:
        out = []
        for z in self.zones:
            with open(os.path.join(z.path, "energy_uj")) as f:
                out.append(int(f.read().strip()))
        return out

    def _begin(self) -> None:
        self._prev = self._read()
        self._acc_uj = 0

    def poll(self) -> None:
        if self._t0 is None:
            return
        now = self._read()
        for z, before, after in zip(self.zones, self._prev, now):
            delta = after - before
            if delta < 0:  # wrapped once since the last read
                delta += z.max_uj
            self._acc_uj += delta
        self._prev = now

    def _end(self) -> float:
        self.poll()
        return self._acc_uj / 1e6


# ---------------------------------------------------------------------------------------- selection
#: A source probes a device and returns a meter, or None when it cannot measure there.
MeterSource = Callable[[str], "EnergyMeter | None"]


def zeus_source(device: str) -> EnergyMeter | None:
    """Zeus/NVML for CUDA devices; None when the device is not a GPU or Zeus/NVML is unavailable."""
    if not str(device).startswith("cuda"):
        return None
    try:
        return ZeusMeter(_gpu_index(device))
    except ImportError as e:
        log.warning("energy: %s; GPU energy will be modelled only", e)
    except Exception as e:  # NVML missing, driver too old, ...
        log.warning("energy: Zeus could not read GPU %s (%s); GPU energy will be modelled only", device, e)
    return None


def rapl_source(device: str, root: str = RAPL_ROOT) -> EnergyMeter | None:
    """RAPL package counters for CPU devices; None when none are readable."""
    if not str(device).startswith("cpu"):
        return None
    zones = find_rapl_zones(root)
    return RaplMeter(zones) if zones else None


DEFAULT_SOURCES: dict[str, MeterSource] = {"zeus": zeus_source, "rapl": rapl_source}
METER_CHOICES = ("auto", "none", *DEFAULT_SOURCES)


def select_meter(device: str = "cpu", meter: str = "auto",
                 sources: Mapping[str, MeterSource] | None = None) -> EnergyMeter:
    """The meter for one rank's ``device`` ("cpu", "cuda", "cuda:1").

    ``meter`` is the ``energy.meter`` setting: ``auto`` tries ``sources`` in order and falls back to
    :class:`NullMeter` ("modelled") when none can measure; ``none`` always gives the NullMeter; a
    source name (``zeus``, ``rapl``) demands that source and raises :class:`ConfigError` saying how
    to fix it when it cannot measure here. ``sources`` maps names to probes
    (``device -> EnergyMeter | None``); default :data:`DEFAULT_SOURCES`.
    """
    sources = DEFAULT_SOURCES if sources is None else sources
    if meter == "none":
        return NullMeter("energy.meter=none")
    if meter == "auto":
        for name, probe in sources.items():
            m = probe(device)
            if m is not None:
                log.info("energy: measuring %s with %s (%s)", device, name, m.scope)
                return m
        return NullMeter(f"no energy counter for {device} among {list(sources)}")
    if meter not in sources:
        raise ConfigError(f"energy.meter={meter!r}: choose one of {['auto', 'none', *sources]}")
    if meter == "zeus" and sources.get("zeus") is zeus_source:
        try:
            import_zeus_monitor()
        except ImportError as e:
            raise ConfigError(f"energy.meter=zeus: {e}; or use energy.meter=auto for modelled energy") from None
    m = sources[meter](device)
    if m is None:
        hint = {"zeus": "it needs an NVIDIA GPU (Volta or newer) on a cuda device",
                "rapl": f"it needs readable {RAPL_ROOT}/intel-rapl:*/energy_uj (often root only) on a cpu device"}
        raise ConfigError(
            f"energy.meter={meter} cannot measure {device} here: {hint.get(meter, 'source unavailable')}; "
            "use energy.meter=auto to fall back to modelled energy"
        )
    return m

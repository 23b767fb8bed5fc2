"""The two clocks of a run: wall time (really wait) and virtual event time (never sleep).

Both answer ``now()`` in seconds since the rank's start and time compute with :meth:`Clock.compute`.
The wall clock sleeps in :meth:`wait_until`; the virtual clock jumps forward. Virtual compute
durations are the thread CPU time the op really took (``durations=measured``: robust to other
processes sharing the cores), or a planned duration the caller passes (``durations=flops`` or
``fixed``: deterministic, independent of the machine).
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterator, Optional

import torch


class Clock(ABC):
    name: ClassVar[str]
    #: True for event time: messages carry their arrival, nothing sleeps (the transport reads this).
    virtual: ClassVar[bool]

    def __init__(self, device: torch.device):
        self._sync = device.type == "cuda"  # GPU work is asynchronous: time it to completion
        #: compute takes this many times as long (an injected straggler, lowbw/config.py FaultsConfig)
        self.slowdown = 1.0

    @abstractmethod
    def now(self) -> float: ...

    @abstractmethod
    def wait_until(self, t: float) -> None: ...

    @abstractmethod
    def compute(self, fn: Callable[[], Any], planned: Optional[float] = None) -> tuple[Any, float, float]:
        """Run ``fn``; return (result, start, end) on this clock."""

    @abstractmethod
    def paused(self) -> contextlib.AbstractContextManager:
        """Time spent inside does not count (evaluation, bookkeeping)."""

    def start(self, at: float = 0.0) -> None:
        """Set the time to ``at`` (0 after the ranks' start-up barrier; a checkpoint's time on resume)."""


class WallClock(Clock):
    name = "wall"
    virtual = False

    def __init__(self, device: torch.device):
        super().__init__(device)
        self._epoch = time.perf_counter()

    def start(self, at: float = 0.0) -> None:
        self._epoch = time.perf_counter() - at

    def now(self) -> float:
        return time.perf_counter() - self._epoch

    def wait_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            time.sleep(delay)

    def compute(self, fn, planned=None):
        t0 = self.now()
        out = fn()
        if self._sync:
            torch.cuda.synchronize()
        if self.slowdown > 1:  # a straggler really is slower on the wall clock
            time.sleep((self.slowdown - 1) * (self.now() - t0))
        return out, t0, self.now()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._epoch += time.perf_counter() - t0


class VirtualClock(Clock):
    name = "virtual"
    virtual = True

    def __init__(self, device: torch.device):
        super().__init__(device)
        self._now = 0.0
        self._paused = 0

    def start(self, at: float = 0.0) -> None:
        self._now = at

    def now(self) -> float:
        return self._now

    def wait_until(self, t: float) -> None:
        if not self._paused:
            self._now = max(self._now, t)

    def compute(self, fn, planned=None):
        t0 = self._now
        if planned is not None:
            out = fn()
            spent = planned
        elif self._sync:  # thread CPU time does not see the GPU: time the kernels to completion
            w0 = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            spent = time.perf_counter() - w0
        else:
            c0 = time.thread_time()
            out = fn()
            spent = time.thread_time() - c0
        if not self._paused:
            self._now += spent * self.slowdown
        return out, t0, self._now

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1


CLOCKS: dict[str, type[Clock]] = {"wall": WallClock, "virtual": VirtualClock}


def make_clock(name: str, device: torch.device) -> Clock:
    return CLOCKS[name](device)


def planned_durations(clock_cfg: Any) -> Optional[str]:
    """How compute is charged: None (measured: the wall clock, or ``durations=measured``), "flops" or "fixed".

    Under planned durations codec work and the optimizer are charged 0 s: the optimizer is O(params)
    per step, a microbatch's forward alone O(params x tokens) (docs/architecture.md).
    """
    if clock_cfg.name == "wall" or clock_cfg.durations == "measured":
        return None
    return clock_cfg.durations

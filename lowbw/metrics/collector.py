"""Rank 0 gathers every rank's per-step report off its critical path.

Rank 0 starts the next step's first forward right after its optimizer step; waiting there for the
other ranks' reports and writing metrics, TensorBoard and the progress bar would delay the whole
pipeline (measured: 6-8 ms per step on the tiny GPT, scripts/bench_overhead.py). A thread does it
instead. The main thread hands over its own report and moves on; :meth:`drain` waits until all
handed-over steps are written (before a checkpoint, at the end).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Optional


class StepCollector:
    def __init__(self, world: int, recv_report: Callable[[int, int], dict], log_step: Callable[..., dict]):
        self.world, self._recv, self._log = world, recv_report, log_step
        self._q: queue.Queue = queue.Queue()
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, daemon=True, name="lowbw-collector")
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                if self.error is None:
                    step, own, excluded = item
                    reports = [own] + [self._recv(r, step) for r in range(1, self.world)]
                    self._log(step, reports, excluded_wall_s=excluded)
            except BaseException as e:  # noqa: BLE001 -- re-raised in the main thread
                self.error = e
            finally:
                self._q.task_done()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, step: int, own_report: dict, excluded_wall_s: float) -> None:
        self._check()
        self._q.put((step, own_report, excluded_wall_s))

    def drain(self) -> None:
        """Wait until every submitted step is logged; raise what went wrong, if anything."""
        self._q.join()
        self._check()

    def close(self, timeout_s: Optional[float] = None) -> None:
        self._q.put(None)
        self._thread.join(timeout_s)

"""Where a rank's per-step report goes: rank 0 records the run, every other rank sends to rank 0.

The step loop (lowbw.rank.loop) is the same on every rank; the difference is this role:

- :class:`SendToRankZero` ships each step's report, and the energy measurement at the end, to rank 0
  over the control channel (never emulated, JSON only).
- :class:`RecordOnRankZero` gathers its own and the others' reports off the critical path
  (lowbw.metrics.collector) and writes the run's files (lowbw.metrics.recorder): metrics.jsonl,
  timeline.jsonl, TensorBoard, summary.json.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional

from lowbw.errors import PeerError
from lowbw.metrics.collector import StepCollector
from lowbw.metrics.recorder import Recorder, format_summary
from lowbw.net.transport import Transport

CTRL_STATS = 2  # phase id of per-step reports on the control channel
CTRL_DONE = 3  # phase id of the end-of-run report (measured energy)


def describe(e: BaseException, rank: int) -> str:
    """One line for a failure on ``rank`` (a peer's failure names the peer itself)."""
    if isinstance(e, PeerError):
        return str(e)
    return f"rank {rank}: {type(e).__name__}: {e}"


class Reporting(ABC):
    def __init__(self, transport: Transport, rank: int, world: int):
        self.transport, self.rank, self.world = transport, rank, world

    @abstractmethod
    def submit(self, step: int, report: dict, eval_wall_s: float) -> None:
        """A step's report (``eval_wall_s``: wall seconds of evaluation in it, left out of wall step time)."""

    def drain(self) -> None:
        """Wait until every submitted step is recorded (before a checkpoint)."""

    def state_dict(self) -> Optional[dict]:
        return None

    def load_state_dict(self, state: Optional[dict]) -> None:
        pass

    @abstractmethod
    def finish(self, measurement: Optional[dict]) -> None:
        """The run's last report: this rank's measured energy (None: nothing measured it)."""

    def complete(self) -> Optional[dict]:
        """After the transport closed: the summary (rank 0), else None."""
        return None

    def fail(self, error: BaseException) -> None:
        """The run failed on this rank: record it if this role records."""


class SendToRankZero(Reporting):
    def submit(self, step: int, report: dict, eval_wall_s: float) -> None:
        self.transport.send_json(0, (CTRL_STATS, step, self.rank, 0), report)

    def finish(self, measurement: Optional[dict]) -> None:
        self.transport.send_json(0, (CTRL_DONE, 0, self.rank, 0), {"measurement": measurement})


class RecordOnRankZero(Reporting):
    def __init__(self, transport: Transport, world: int, cfg: Any, run_dir: Path, meta: dict):
        super().__init__(transport, 0, world)
        self.cfg = cfg
        self.recorder = Recorder(run_dir, cfg.clock.name, world, cfg.train.batch_size * cfg.model.block_size,
                                 cfg.train.steps, cfg.train.warmup_steps, cfg.progress, meta)
        self.collector = StepCollector(
            world, lambda r, step: transport.recv_json(r, (CTRL_STATS, step, r, 0)), self.recorder.log_step)

    def submit(self, step: int, report: dict, eval_wall_s: float) -> None:
        self.collector.submit(step, report, eval_wall_s)

    def drain(self) -> None:
        self.collector.drain()  # the recorder's totals must include every step so far

    def state_dict(self) -> dict:
        return self.recorder.state_dict()

    def load_state_dict(self, state: Optional[dict]) -> None:
        self.recorder.load_state_dict(state)

    def finish(self, measurement: Optional[dict]) -> None:
        self.collector.drain()
        measured = [measurement] + [self.transport.recv_json(r, (CTRL_DONE, 0, r, 0))["measurement"]
                                    for r in range(1, self.world)]
        self.recorder.set_energy_inputs(self.cfg.hardware, self.cfg.energy, measured)

    def complete(self) -> dict:
        self.collector.close()
        summary = self.recorder.finish("completed")
        print("\n" + format_summary(summary), flush=True)
        return summary

    def fail(self, error: BaseException) -> None:
        self.collector.close(timeout_s=5.0)  # let it finish the step it is writing, if it can
        self.recorder.finish("failed", describe(error, self.rank))

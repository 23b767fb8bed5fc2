"""Where a rank's per-step report goes: rank 0 records the run, every other rank sends to rank 0.

The step loop (lowbw.rank.loop) is the same on every rank; the difference is this role:

- :class:`SendToRankZero` ships each step's report, and the energy measurement at the end, to rank 0
  over the control channel (never emulated, JSON only).
- :class:`RecordOnRankZero` gathers its own and the others' reports off the critical path
  (lowbw.metrics.collector) and writes the run's files (lowbw.metrics.recorder): metrics.jsonl,
  timeline.jsonl, TensorBoard, summary.json.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from lowbw.errors import ConfigError, Diverged, Interrupted, PeerError
from lowbw.metrics.collector import StepCollector
from lowbw.metrics.files import OutputError
from lowbw.metrics.recorder import Recorder, format_summary
from lowbw.metrics.tensorboard import hparams_of
from lowbw.net.transport import Transport
from lowbw.regime import Regime

CTRL_STATS = 2  # phase id of per-step reports on the control channel
CTRL_DONE = 3  # phase id of the end-of-run report (measured energy)


def describe(e: BaseException, rank: int) -> str:
    """One line for a failure on ``rank`` (a peer's failure names the peer itself); the exception's type
    only where the message alone would not say what went wrong."""
    if isinstance(e, PeerError):
        return str(e)
    if isinstance(e, (Interrupted, Diverged, OutputError, ConfigError)):
        return f"rank {rank}: {e}"
    text = str(e).strip().splitlines()
    return f"rank {rank}: {type(e).__name__}: {text[0] if text else ''}"


class OutputsFailed(RuntimeError):
    """The run trained to the end but an output file could not be written (summary.json says which)."""


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

    def fail(self, error: BaseException) -> None:
        # A divergence stops every rank at the same point, and rank 0 waits for the reports each hands over as it
        # stops (lowbw.rank.loop.HeldReport): they must be delivered before this process exits, since a gloo send
        # moves its bytes only once rank 0 has posted the receive.
        if isinstance(error, Diverged):
            self.transport.flush(control_only=True)


class RecordOnRankZero(Reporting):
    def __init__(self, transport: Transport, world: int, cfg: Any, run_dir: Path, meta: dict,
                 regime: Optional[Regime] = None):
        """``regime``: the target deployment the clock times (lowbw/regime.py): tokens are the target's, and
        energy is modelled for the target only (a meter here would measure this machine, not the target)."""
        super().__init__(transport, 0, world)
        self.cfg, self.regime = cfg, regime
        tokens = regime.tokens_per_step if regime is not None else cfg.train.batch_size * cfg.model.block_size
        tokens *= meta.get("replicas") or 1  # every replica trains on a batch of its own
        self.recorder = Recorder(run_dir, cfg.clock.name, world, tokens,
                                 cfg.train.steps, cfg.train.warmup_steps, cfg.progress, meta, hardware=cfg.hardware,
                                 energy=cfg.energy, target_loss=cfg.train.target_loss,
                                 hparams=hparams_of(OmegaConf.to_container(cfg, resolve=True)))
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
        if self.regime is not None:
            measured = [None] * self.world
        self.recorder.set_energy_inputs(self.cfg.hardware, self.cfg.energy, measured)

    def _warnings(self) -> list[str]:
        """The plan's warnings, and outages that start after the run's end on the run clock (never happened)."""
        end = self.recorder.clock_end_s
        late = [f"faults.outages[{i}] starts at {o.start_s:g} s but the run ended at {end:.4g} s on the run clock: "
                "it never happened" for i, o in enumerate(self.cfg.faults.outages or []) if o.start_s >= end]
        for w in late:
            print(f"lowbw: warning: {w}", file=sys.stderr, flush=True)
        return list(self.recorder.meta.get("warnings") or []) + late

    def complete(self) -> dict:
        self.collector.close()
        summary = self.recorder.finish("completed", warnings=self._warnings())
        if summary["status"] != "completed":
            raise OutputsFailed(summary["error"])
        return summary

    def fail(self, error: BaseException) -> None:
        """Record the run as interrupted, diverged or failed, with the figures of every step recorded."""
        interrupted = isinstance(error, Interrupted)
        # Let the collector finish the step it is writing, if it can (peers that stop send no more). A divergence
        # stops every rank at the same point, each handing over its checked reports first -- a step's, when its
        # check came a step later (lowbw.rank.loop.HeldReport), only now: those are waited for, as long as a
        # silent peer is.
        self.collector.close(timeout_s=0.5 if interrupted else self.cfg.timeout_s if isinstance(error, Diverged)
                             else 1.0)
        if interrupted:  # stop at once: the figures, not the pictures
            summary = self.recorder.finish("interrupted", describe(error, self.rank), pictures=False)
        elif isinstance(error, Diverged):
            summary = self.recorder.finish("diverged", describe(error, self.rank), diverged_step=error.step)
        else:
            link = getattr(error, "link", None)
            peer = None if link else error.peer if isinstance(error, PeerError) else self.rank
            summary = self.recorder.finish("failed", describe(error, self.rank), failed_rank=peer, failed_link=link)
        print("\n" + format_summary(summary), file=sys.stderr, flush=True)

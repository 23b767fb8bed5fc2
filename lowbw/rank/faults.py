"""Faults injected into a rank on purpose (faults.* settings): a slowed rank and a crashing rank.

Link faults (outages, bandwidth traces, packet loss) live in the link model (lowbw.net.conditions);
these two act on the rank itself, step by step.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace
from typing import Any

from lowbw.net.clock import Clock
from lowbw.net.transport import Transport


class RankFaults:
    def __init__(self, faults: Any, rank: int, clock: Clock, transport: Transport):
        self.rank, self.clock, self.transport = rank, clock, transport
        # read once: every step reads them, and an attribute of the run's DictConfig costs ~25 us
        self.f = SimpleNamespace(**{k: getattr(faults, k) for k in (
            "straggler_every", "straggler_burst", "straggler_factor", "straggler_rank", "crash_rank", "crash_step")})

    def crashes_at(self, step: int) -> bool:
        return self.rank == self.f.crash_rank and step == self.f.crash_step

    def before_step(self, step: int) -> None:
        f = self.f
        # Straggler: compute takes straggler_factor times as long, all the time or in bursts of
        # straggler_burst steps every straggler_every steps.
        in_burst = f.straggler_every == 0 or step % f.straggler_every < f.straggler_burst
        self.clock.slowdown = f.straggler_factor if self.rank == f.straggler_rank and in_burst else 1.0
        if self.crashes_at(step):
            self.transport.flush()  # what earlier steps sent is on the wire; this step's work is lost
            print(f"lowbw: rank {self.rank} crashing at step {step} (faults.crash_rank)", file=sys.stderr, flush=True)
            os._exit(3)

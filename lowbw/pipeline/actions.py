"""Schedules as data: per-rank ordered lists of actions.

The notation is that of ``torch.distributed.pipelining`` (``_Action`` / ``_ComputationType``):
an action prints as ``<stage><TYPE><microbatch>``, e.g. ``0F3`` (stage 0, forward of microbatch 3),
``2SEND_F3`` (stage 2 sends its forward output of microbatch 3 to stage 3), ``3RECV_F3`` (stage 3
receives that input), ``3SEND_B3`` (stage 3 sends the gradient of its input back to stage 2),
``2RECV_B3``. A schedule is a ``dict[rank, list[Action]]``; one CSV row per rank, one cell per
action, reads and writes the same files as torch's ``_dump_csv`` / ``_load_csv`` (torchtitan's
``pipeline_parallel_schedule_csv``).

Generators (lowbw.pipeline.schedules) write compute actions only; :func:`add_communication`
lowers them, placing each receive right before the compute that needs it and each send right
after the compute that produces it -- the lowering torch.distributed.pipelining applies to its
"compute_only" CSVs.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import ClassVar, NamedTuple

from lowbw.errors import ScheduleError


class Kind(str, Enum):
    FORWARD = "F"
    FULL_BACKWARD = "B"  # input gradient and weight gradient together
    BACKWARD_INPUT = "I"  # input gradient only (zero-bubble schedules)
    BACKWARD_WEIGHT = "W"  # weight gradient only, may be deferred
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"


COMPUTE_KINDS = frozenset({Kind.FORWARD, Kind.FULL_BACKWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT})

_ACTION_RE = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)$")
# torch's compute_comms CSVs also hold FSDP/DP bookkeeping (0UNSHARD, 0RESHARD, 0REDUCE_GRAD): no-ops here.
_TORCH_NOOP_RE = re.compile(r"^\d*(UNSHARD|RESHARD|REDUCE_GRAD)(\d*)$")


class Action(NamedTuple):
    stage: int
    kind: Kind
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.microbatch}"

    __repr__ = __str__

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS

    @staticmethod
    def parse(text: str) -> "Action":
        match = _ACTION_RE.match(text.strip())
        if not match:
            raise ValueError(
                f"cannot read action {text!r}: expected <stage><F|B|I|W|SEND_F|RECV_F|SEND_B|RECV_B><microbatch>, e.g. 2F0"
            )
        stage, kind, mb = match.groups()
        return Action(int(stage), Kind(kind), int(mb))


@dataclass(frozen=True)
class Schedule:
    """A complete pipeline schedule for one optimizer step.

    ``actions[r]`` is rank r's ordered action list; ``stage_to_rank[s]`` is the rank that holds
    stage s (several stages per rank for interleaved schedules).
    """

    name: str
    n_stages: int
    n_microbatches: int
    stage_to_rank: tuple[int, ...]
    actions: dict[int, list[Action]]

    #: True when steps overlap (microbatches and weight versions outlive a step): PipeDream-2BW.
    asynchronous: ClassVar[bool] = False

    @property
    def n_ranks(self) -> int:
        return len(self.actions)

    def stages_of(self, rank: int) -> list[int]:
        return [s for s, r in enumerate(self.stage_to_rank) if r == rank]

    def to_csv(self, path: str | Path, compute_only: bool = False) -> None:
        """Write one row per rank, one action per cell (torch.distributed.pipelining's format).

        ``compute_only``: F/B/I/W only (torch's "compute_only" format); else with sends and receives
        ("compute_comms")."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            for rank in range(self.n_ranks):
                writer.writerow([str(a) for a in self.actions[rank] if a.is_compute or not compute_only])

    @staticmethod
    def from_csv(path: str | Path, name: str | None = None) -> "Schedule":
        """Read a schedule written by :meth:`to_csv` or by torch's ``_dump_csv``.

        Rows with compute actions only ("compute_only" format) get their send/receive actions
        added by :func:`add_communication`.
        """
        rows: dict[int, list[Action]] = {}
        with open(path, newline="") as f:
            for rank, row in enumerate(csv.reader(f)):
                try:
                    rows[rank] = [Action.parse(c) for c in row if c.strip() and not _TORCH_NOOP_RE.match(c.strip())]
                except ValueError as e:
                    raise ValueError(f"{path}: rank {rank}: {e}") from None
        if not rows:
            raise ValueError(f"{path}: the schedule file has no rows")
        stage_to_rank = infer_stage_to_rank(rows)
        n_stages = len(stage_to_rank)
        n_mb = 1 + max(a.microbatch for acts in rows.values() for a in acts)
        has_comm = any(not a.is_compute for acts in rows.values() for a in acts)
        if not has_comm:
            rows = add_communication(rows, stage_to_rank)
        else:  # torch posts receives early and waits at the compute; here a receive waits where it stands
            rows = place_receives(rows, stage_to_rank)
        return Schedule(name or Path(path).stem, n_stages, n_mb, stage_to_rank, rows)


# ---- lowering: where sends and receives go -------------------------------------------------

Rows = dict[int, list[Action]]


def infer_stage_to_rank(rows: Rows) -> tuple[int, ...]:
    owner: dict[int, int] = {}
    for rank, acts in rows.items():
        for a in acts:
            if owner.setdefault(a.stage, rank) != rank:
                raise ScheduleError(f"rank {rank} action {a}: stage {a.stage} also appears on rank {owner[a.stage]}")
    n = 1 + max(owner) if owner else 0
    missing = [s for s in range(n) if s not in owner]
    if missing:
        raise ScheduleError(f"no rank runs stage(s) {missing}")
    return tuple(owner[s] for s in range(n))


def add_communication(rows: Rows, stage_to_rank: tuple[int, ...]) -> Rows:
    """Insert RECV_* before and SEND_* after compute actions whose neighbour stage is on another rank."""
    last = len(stage_to_rank) - 1
    out: Rows = {}
    for rank, acts in rows.items():
        lowered: list[Action] = []
        for a in acts:
            s, mb = a.stage, a.microbatch
            prev_remote = s > 0 and stage_to_rank[s - 1] != rank
            next_remote = s < last and stage_to_rank[s + 1] != rank
            if a.kind == Kind.FORWARD:
                if prev_remote:
                    lowered.append(Action(s, Kind.RECV_F, mb))
                lowered.append(a)
                if next_remote:
                    lowered.append(Action(s, Kind.SEND_F, mb))
            elif a.kind in (Kind.FULL_BACKWARD, Kind.BACKWARD_INPUT):
                if next_remote:
                    lowered.append(Action(s, Kind.RECV_B, mb))
                lowered.append(a)
                if prev_remote:
                    lowered.append(Action(s, Kind.SEND_B, mb))
            else:
                lowered.append(a)
        out[rank] = lowered
    return out


def place_receives(rows: Rows, stage_to_rank: tuple[int, ...]) -> Rows:
    """Move each RECV_* to just before the first compute on its rank that needs it.

    torch.distributed.pipelining posts receives early (irecv) and waits for them at the compute; in
    lowbw a receive blocks where it stands. Placing it right before its consumer gives the same
    timing. Sends and computes keep their order; a receive with no consumer stays where it was.
    """
    out: Rows = {}
    for rank, acts in rows.items():
        pending: dict[tuple, Action] = {}
        lowered: list[Action] = []
        for a in acts:
            if a.kind in (Kind.RECV_F, Kind.RECV_B):
                pending[(a.kind, a.stage, a.microbatch)] = a
                continue
            if a.kind == Kind.FORWARD:
                need = (Kind.RECV_F, a.stage, a.microbatch)
            elif a.kind in (Kind.FULL_BACKWARD, Kind.BACKWARD_INPUT):
                need = (Kind.RECV_B, a.stage, a.microbatch)
            else:
                need = None
            if need in pending:
                lowered.append(pending.pop(need))
            lowered.append(a)
        lowered += pending.values()
        out[rank] = lowered
    return out

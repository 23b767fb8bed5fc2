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

Overlapped pairs: torch's ``(0F3;3B1)OVERLAP_F_B`` (DualPipeV) is a forward of one chunk and a
backward of another that run as one unit. lowbw keeps the two actions, in order, and records the
pair in :attr:`Schedule.overlaps`; lowering puts the receives of both parts before the pair and
their sends after it (as torch's own lowering does), so the pair starts once both inputs are in,
and the CSV writer merges it back into one cell.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import ClassVar, NamedTuple, Optional

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
BACKWARD_KINDS = frozenset({Kind.FULL_BACKWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT})

_ACTION_RE = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)$")
# torch's compute_comms CSVs also hold FSDP/DP bookkeeping (0UNSHARD, 0RESHARD, 0REDUCE_GRAD): no-ops here.
_TORCH_NOOP_RE = re.compile(r"^\d*(UNSHARD|RESHARD|REDUCE_GRAD)(\d*)$")
# torch's composite action (ScheduleDualPipeV): "(0F3;3B1)OVERLAP_F_B", a forward and a backward of two
# chunks that torch's runtime runs one after the other; lowbw reads it as those actions, in that order.
_OVERLAP_RE = re.compile(r"^\((.*)\)OVERLAP_F_B$")


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


#: (rank, first, second): two compute actions of one rank that run as one unit (torch's OVERLAP_F_B)
Overlap = tuple[int, "Action", "Action"]


def parse_cell(text: str) -> list[Action]:
    """The actions of one CSV cell: none (empty, or torch's FSDP bookkeeping), one, or the two parts of
    torch's ``(<forward>;<backward>)OVERLAP_F_B``."""
    text = text.strip()
    if not text or _TORCH_NOOP_RE.match(text):
        return []
    overlap = _OVERLAP_RE.match(text)
    if overlap:
        parts = [Action.parse(t) for t in overlap.group(1).split(";") if t.strip()]
        if len(parts) != 2 or parts[0].kind != Kind.FORWARD or parts[1].kind not in BACKWARD_KINDS:
            raise ValueError(f"cannot read action {text!r}: OVERLAP_F_B pairs a forward and a backward, "
                             "e.g. (0F3;3B1)OVERLAP_F_B")
        return parts
    return [Action.parse(text)]



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
    #: pairs that run as one unit (torch's OVERLAP_F_B); lowering already placed their messages
    overlaps: frozenset[Overlap] = frozenset()

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
                cells: list[str] = []
                for a in self.actions[rank]:
                    if cells and (rank, cells[-1], a) in self._overlap_cells:
                        cells[-1] = f"({cells[-1]};{a})OVERLAP_F_B"
                    elif a.is_compute or not compute_only:
                        cells.append(str(a))
                writer.writerow(cells)

    @property
    def _overlap_cells(self) -> set[tuple[int, str, Action]]:
        return {(r, str(a), b) for r, a, b in self.overlaps}

    @staticmethod
    def from_csv(path: str | Path, name: str | None = None) -> "Schedule":
        """Read a schedule written by :meth:`to_csv` or by torch's ``_dump_csv``.

        Rows with compute actions only ("compute_only" format) get their send/receive actions
        added by :func:`add_communication`.
        """
        rows: dict[int, list[Action]] = {}
        overlaps: set[Overlap] = set()
        with open(path, newline="") as f:
            for rank, row in enumerate(csv.reader(f)):
                rows[rank] = []
                for cell in row:
                    try:
                        parts = parse_cell(cell)
                    except ValueError as e:
                        raise ValueError(f"{path}: rank {rank}: {e}") from None
                    rows[rank] += parts
                    if len(parts) == 2:
                        overlaps.add((rank, parts[0], parts[1]))
        if not rows:
            raise ValueError(f"{path}: the schedule file has no rows")
        stage_to_rank = infer_stage_to_rank(rows)
        n_stages = len(stage_to_rank)
        n_mb = 1 + max(a.microbatch for acts in rows.values() for a in acts)
        has_comm = any(not a.is_compute for acts in rows.values() for a in acts)
        if not has_comm:
            rows = add_communication(rows, stage_to_rank, overlaps)
        else:  # torch posts receives early and waits at the compute; here a receive waits where it stands
            rows = place_receives(rows, stage_to_rank, overlaps)
        return Schedule(name or Path(path).stem, n_stages, n_mb, stage_to_rank, rows, frozenset(overlaps))



def check_complete(sched: Schedule) -> None:
    """ScheduleError naming the first missing compute action: every stage runs, on its rank, the forward
    of every microbatch and its backward (``B``, or ``I`` and ``W``).

    Checked before the schedule is played, so that a schedule missing an action is told which one, not
    that it deadlocks at a receive waiting for the missing action's message."""
    S, M, owner = sched.n_stages, sched.n_microbatches, sched.stage_to_rank
    # one flag per (stage, microbatch, compute kind), set by the actions a stage runs on its own rank
    seen = bytearray(S * M * 4)
    for rank, acts in sched.actions.items():  # one pass over every action
        mine = {s for s in range(S) if owner[s] == rank}
        for i in [(s * M + mb) * 4 + _SLOT[k] for s, k, mb in acts if k in _SLOT and s in mine and 0 <= mb < M]:
            seen[i] = 1
    forward, full, inp, weight = (seen[slot::4] for slot in range(4))
    backward = bytes(map(max, full, map(min, inp, weight)))
    if 0 not in forward and 0 not in backward:
        return
    first = next(i for i in range(S * M) if not forward[i] or not backward[i])
    s, mb = divmod(first, M)
    f, b, i, w = (Action(s, k, mb) for k in _SLOT)
    if not forward[first]:
        missing = f"{f} (stage {s}'s forward of microbatch {mb})"
    elif not inp[first] and not weight[first]:
        missing = f"{b} (stage {s}'s backward of microbatch {mb}; or {i} and {w})"
    elif not weight[first]:
        missing = f"{w} (stage {s}'s weight gradient of microbatch {mb}, after {i})"
    else:
        missing = f"{i} (stage {s}'s input gradient of microbatch {mb}, before {w})"
    raise ScheduleError(f"rank {owner[s]} never runs {missing}; every stage needs it for every microbatch")


#: the flag slot of each compute kind in :func:`check_complete` (also their order there: F, B, I, W)
_SLOT = {Kind.FORWARD: 0, Kind.FULL_BACKWARD: 1, Kind.BACKWARD_INPUT: 2, Kind.BACKWARD_WEIGHT: 3}


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


def _units(acts: list[Action], rank: int, overlaps: frozenset[Overlap] | set) -> list[list[Action]]:
    """A rank's actions grouped into what runs as one unit: single actions, and overlapped pairs."""
    units: list[list[Action]] = []
    for a in acts:
        if units and (rank, units[-1][-1], a) in overlaps:
            units[-1].append(a)
        else:
            units.append([a])
    return units


def _message_kinds(s: int, kind: Kind, rank: int,
                   stage_to_rank: tuple[int, ...]) -> tuple[Optional[Kind], Optional[Kind]]:
    """(receive before, send after) a compute of ``kind`` on stage s, each None when the neighbour stage it
    talks to is on this rank (or absent)."""
    last = len(stage_to_rank) - 1
    prev_remote = s > 0 and stage_to_rank[s - 1] != rank
    next_remote = s < last and stage_to_rank[s + 1] != rank
    if kind == Kind.FORWARD:
        return (Kind.RECV_F if prev_remote else None), (Kind.SEND_F if next_remote else None)
    if kind in (Kind.FULL_BACKWARD, Kind.BACKWARD_INPUT):
        return (Kind.RECV_B if next_remote else None), (Kind.SEND_B if prev_remote else None)
    return None, None


def _needs(a: Action, rank: int, stage_to_rank: tuple[int, ...]) -> tuple[list[Action], list[Action]]:
    """(receives before, sends after) a compute action whose neighbour stages are on other ranks."""
    recv, send = _message_kinds(a.stage, a.kind, rank, stage_to_rank)
    s, mb = a.stage, a.microbatch
    return ([Action(s, recv, mb)] if recv else []), ([Action(s, send, mb)] if send else [])


def add_communication(rows: Rows, stage_to_rank: tuple[int, ...], overlaps: frozenset[Overlap] | set = frozenset()) -> Rows:
    """Insert RECV_* before and SEND_* after compute actions whose neighbour stage is on another rank
    (before and after the whole unit for an overlapped pair)."""
    paired = {r for r, _, _ in overlaps}
    return {rank: _lower_units(acts, rank, stage_to_rank, overlaps) if rank in paired
            else _lower(acts, rank, stage_to_rank) for rank, acts in rows.items()}


def _lower_units(acts: list[Action], rank: int, stage_to_rank: tuple[int, ...],
                 overlaps: frozenset[Overlap] | set) -> list[Action]:
    """A rank's row lowered unit by unit: an overlapped pair's receives before it, its sends after it."""
    lowered: list[Action] = []
    for unit in _units(acts, rank, overlaps):
        recvs, sends = [], []
        for a in unit:
            r, snd = _needs(a, rank, stage_to_rank)
            recvs += r
            sends += snd
        lowered += recvs + unit + sends
    return lowered


def _lower(acts: list[Action], rank: int, stage_to_rank: tuple[int, ...]) -> list[Action]:
    """A rank's row with no overlapped pair lowered: what :func:`_lower_units` gives, in one pass.

    Why not through it: this runs once per action (~10^5 at 64 stages x 256 microbatches), so the
    messages of each (kind, stage) are worked out once, and the actions made by ``tuple.__new__`` (what
    ``Action(...)`` calls, less the call of its Python-level ``__new__``: half the cost)."""
    S = len(stage_to_rank)
    mine = [s for s in range(S) if stage_to_rank[s] == rank]
    plan: dict[Kind, list] = {k: [None] * S for k in (Kind.FORWARD, Kind.FULL_BACKWARD, Kind.BACKWARD_INPUT)}
    for kind, by_stage in plan.items():
        for s in mine:
            by_stage[s] = _message_kinds(s, kind, rank, stage_to_rank)
    lowered: list[Action] = []
    add, new = lowered.append, tuple.__new__
    for a in acts:
        s, kind, mb = a
        by_stage = plan.get(kind)
        if by_stage is None:  # a weight gradient, or a send or receive already there: no message
            add(a)
            continue
        need = by_stage[s] if 0 <= s < S else None
        recv, send = need if need is not None else _message_kinds(s, kind, rank, stage_to_rank)  # (not held)
        if recv:
            add(new(Action, (s, recv, mb)))
        add(a)
        if send:
            add(new(Action, (s, send, mb)))
    return lowered


def place_receives(rows: Rows, stage_to_rank: tuple[int, ...], overlaps: frozenset[Overlap] | set = frozenset()) -> Rows:
    """Move each RECV_* to just before the first compute on its rank that needs it (before the whole
    unit for an overlapped pair).

    torch.distributed.pipelining posts receives early (irecv) and waits for them at the compute; in
    lowbw a receive blocks where it stands. Placing it right before its consumer gives the same
    timing. Sends and computes keep their order; a receive with no consumer stays where it was.
    """
    out: Rows = {}
    for rank, acts in rows.items():
        pending: dict[tuple, Action] = {}
        lowered: list[Action] = []
        for unit in _units(acts, rank, overlaps):
            if len(unit) == 1 and unit[0].kind in (Kind.RECV_F, Kind.RECV_B):
                a = unit[0]
                pending[(a.kind, a.stage, a.microbatch)] = a
                continue
            for a in unit:
                if a.kind == Kind.FORWARD:
                    need = (Kind.RECV_F, a.stage, a.microbatch)
                elif a.kind in (Kind.FULL_BACKWARD, Kind.BACKWARD_INPUT):
                    need = (Kind.RECV_B, a.stage, a.microbatch)
                else:
                    need = None
                if need in pending:
                    lowered.append(pending.pop(need))
            lowered += unit
        lowered += pending.values()
        out[rank] = lowered
    return out

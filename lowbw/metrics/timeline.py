"""What each rank did and when: the record energy accounting, bubble fractions and pictures read.

Times are in seconds on the run's clock (``clock`` says which: "virtual" event time or "wall"
time since the run's start on that rank). An event is either compute (busy: forward, backward,
codec work, optimizer) or communication as seen by the rank (a send handed to the link, a receive
waited on). Idle time is what is left of the span: it is derived, never recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Sequence

#: Event kinds. Compute kinds count as busy time; the others do not.
#: "sync": a replica group's arithmetic (sums, codec work; lowbw.replicas), "sync_wait": waiting for its messages.
COMPUTE = frozenset({"forward", "backward", "backward_input", "backward_weight", "encode", "decode", "optimizer",
                     "sync"})


class Event(NamedTuple):
    """One thing a rank did. A named tuple: an executor records several per message, and a frozen dataclass
    took 2.3 us to make here against 0.8 us; a rank's report carries them as JSON arrays in this field order
    (:func:`event_dict` names them again)."""

    rank: int
    kind: str  # one of COMPUTE, or "send" / "recv_wait" / "sync_wait"
    start: float  # s, run clock
    end: float  # s, run clock
    step: int
    label: str = ""  # e.g. the action, "1F3"
    nbytes: int = 0  # bytes on the wire, for sends
    peer: int = -1  # the other rank, for sends and receives

    @property
    def duration(self) -> float:
        return self.end - self.start


def event_dict(row: Sequence) -> dict:
    """An event, or its row in a rank's report, as the named fields of a timeline.jsonl line."""
    return dict(zip(Event._fields, row))


@dataclass
class Timeline:
    clock: str  # "virtual" | "wall"
    n_ranks: int
    events: list[Event] = field(default_factory=list)

    def add(self, event: Event) -> None:
        self.events.append(event)

    def busy(self, rank: int, start: float = float("-inf"), end: float = float("inf")) -> float:
        """Seconds of compute on ``rank`` inside [start, end]."""
        return busy_seconds((e for e in self.events if e.rank == rank), start, end)


def busy_seconds(events: Iterable[Event], start: float = float("-inf"), end: float = float("inf")) -> float:
    """Seconds of compute among ``events`` (one rank's), inside [start, end]: the rank's busy time.

    A rank computes on one thread, so its compute events never overlap and their sum is their union.
    """
    total = 0.0
    for e in events:
        if e.kind in COMPUTE:
            total += max(0.0, min(e.end, end) - max(e.start, start))
    return total

"""The player: one event-time engine that validates schedules, times them, and drives the simulator.

Malformed schedules fail with a sentence naming the rank and the action (pinned word for word below: the
executor's users and the docs quote them); valid ones play in list order on every rank.
"""

from __future__ import annotations

import pytest

from lowbw.errors import ScheduleError
from lowbw.pipeline.actions import Action, Schedule
from lowbw.pipeline.validate import validate_schedule


def sched(rows: list[str], stages: int = 2, m: int = 1, stage_to_rank=None, name: str = "t") -> Schedule:
    actions = {r: [Action.parse(x) for x in row.split()] for r, row in enumerate(rows)}
    return Schedule(name, stages, m, tuple(stage_to_rank or range(stages)), actions)


MALFORMED = {
    "a stage the rank does not hold": (
        sched(["0F0 1F0", "1F0"]),
        "rank 0 action 1F0: stage 1 is not held by rank 0"),
    "a microbatch out of range": (
        sched(["0F0 0SEND_F0 0RECV_B0 0B0 0F1", "1RECV_F0 1F0 1B0 1SEND_B0"]),
        "rank 0 action 0F1: microbatch 1 outside 0..0"),
    "a forward before its input arrives": (
        sched(["0F0 0SEND_F0 0RECV_B0 0B0", "1F0 1RECV_F0 1B0 1SEND_B0"]),
        "rank 1 action 1F0: runs before its input (1RECV_F0) on this rank"),
    "a backward before its forward": (
        sched(["0B0 0F0"], stages=1),
        "rank 0 action 0B0: runs before 0F0 on this rank"),
    "a backward before its output gradient arrives": (
        sched(["0F0 0SEND_F0 0B0 0RECV_B0", "1RECV_F0 1F0 1B0 1SEND_B0"]),
        "rank 0 action 0B0: runs before its output gradient (0RECV_B0) on this rank"),
    "a backward before the next local stage's backward": (
        sched(["0F0 1F0 0B0 1B0"], stage_to_rank=[0, 0]),
        "rank 0 action 0B0: runs before its output gradient (0RECV_B0) on this rank"),
    "a weight gradient before its input gradient": (
        sched(["0F0 0W0 0I0"], stages=1),
        "rank 0 action 0W0: runs before 0I0 on this rank"),
    "a send before the forward that makes it": (
        sched(["0SEND_F0 0F0 0RECV_B0 0B0", "1RECV_F0 1F0 1B0 1SEND_B0"]),
        "rank 0 action 0SEND_F0: runs before 0F0 on this rank"),
    "a gradient sent before the backward that makes it": (
        sched(["0F0 0SEND_F0 0RECV_B0 0B0", "1RECV_F0 1F0 1SEND_B0 1B0"]),
        "rank 1 action 1SEND_B0: runs before 1B0 or 1I0 on this rank"),
    "a message sent twice": (
        sched(["0F0 0SEND_F0 0SEND_F0 0RECV_B0 0B0", "1RECV_F0 1F0 1B0 1SEND_B0"]),
        "rank 0 action 0SEND_F0: sends ('F', 1, 0) to rank 1 twice"),
    "a compute run twice": (
        sched(["0F0 0F0"], stages=1),
        "rank 0 action 0F0: runs twice in one step"),
    "two ranks waiting for each other": (
        sched(["0RECV_B0 0F0 0SEND_F0 0B0", "1RECV_F0 1F0 1B0 1SEND_B0"]),
        "schedule 't' deadlocks: rank 0 waits at 0RECV_B0 for a message that a blocked rank has not sent yet; "
        "rank 1 waits at 1RECV_F0 for a message that a blocked rank has not sent yet"),
    "a receive no rank sends": (
        sched(["0F0 0RECV_B0 0B0", "1RECV_F0 1F0 1B0 1SEND_B0"]),
        "schedule 't' deadlocks: rank 0 waits at 0RECV_B0 for a message that a blocked rank has not sent yet; "
        "rank 1 waits at 1RECV_F0 for a message no rank sends"),
    "a send no rank receives": (
        sched(["0F0 0SEND_F0 0F1 0SEND_F1", "1RECV_F0 1F0"], m=2, name="forward_only"),
        "rank 0 action 0SEND_F1: sends ('F', 1, 1) to rank 1, which never receives it"),
    "a send past the last stage": (
        sched(["0F0 0SEND_F0 0RECV_B0 0B0", "1RECV_F0 1F0 1SEND_F0 1B0 1SEND_B0"]),
        "action 1SEND_F0: stage 1 has no neighbour stage 2"),
    "a microbatch never forwarded": (
        sched(["0F0 0SEND_F0 0RECV_B0 0B0", "1RECV_F0 1F0 1B0 1SEND_B0"], m=2),
        "rank 0: stage 0 never runs the forward of microbatch 1 (0F1)"),
    "a microbatch never backpropagated": (
        sched(["0F0 0SEND_F0", "1RECV_F0 1F0"]),
        "rank 0: stage 0 never runs the backward of microbatch 0 (0B0)"),
}


@pytest.mark.parametrize("what", sorted(MALFORMED))
def test_malformed_schedule_is_refused_with_a_sentence_naming_rank_and_action(what):
    bad, message = MALFORMED[what]
    with pytest.raises(ScheduleError) as err:
        validate_schedule(bad)
    assert str(err.value) == message


def test_forward_only_schedule_needs_no_backward():
    validate_schedule(sched(["0F0 0SEND_F0", "1RECV_F0 1F0"], name="forward_only"))

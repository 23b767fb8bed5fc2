"""The player: one event-time engine that validates schedules, times them, and drives the simulator.

Malformed schedules fail with a sentence naming the rank and the action (pinned word for word below: the
executor's users and the docs quote them); valid ones play in list order on every rank.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from lowbw.errors import ScheduleError
from lowbw.net.link import LinkModel
from lowbw.net.topology import PairLink, Topology
from lowbw.pipeline import program
from lowbw.pipeline.actions import Action, Kind, Schedule
from lowbw.pipeline.player import Player, compile_schedule, message_key, play, validate_schedule
from lowbw.pipeline.schedules import build_schedule


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


VARIANTS = [("gpipe", {}), ("1f1b", {}), ("zb_h1", {}), ("interleaved_1f1b", {"virtual_stages": 2})]


@pytest.mark.parametrize("name,params", VARIANTS)
@pytest.mark.parametrize("semantics", ["pipelined", "serialized"])
def test_fixed_cost_loop_gives_exactly_what_link_model_calls_give(name, params, semantics):
    """The inlined arithmetic of time-invariant links against LinkModel.send/deliver call by call (what a
    recorded step uses), over three steps whose queues carry over; downlinks slower than some pairs, so
    that receives contend."""
    rng = random.Random(f"{name}{semantics}")
    p, m = 4, 8
    sched = build_schedule(SimpleNamespace(name=name, csv=None, **params), p, m)
    pairs = {(i, j): PairLink(rng.uniform(0, 0.05), 0.0, rng.uniform(1e6, 1e8))
             for i in range(p) for j in range(p) if i != j}
    topo = Topology(p, semantics, (5e7,) * p, (2e7,) * p, pairs)
    times: dict = {}

    def duration(r, a):
        return times.setdefault((r, a), rng.uniform(0.01, 0.2))

    def size(a):
        return 10_000 + 100 * a.microbatch

    links_a = {r: LinkModel(topo, r) for r in range(p)}
    links_b = {r: LinkModel(topo, r) for r in range(p)}
    prog = compile_schedule(sched)
    fixed, called = Player(prog, duration, size, links_a), Player(prog, duration, size, links_b)
    assert fixed.fixed
    start_a = start_b = None
    for step in range(3):
        a = fixed.play(start_a, step)
        b = called.play(start_b, step, record=True)
        assert a.end == b.end and a.busy == b.busy and a.link_bytes == b.link_bytes
        assert [links_a[r].uplink_free for r in range(p)] == [links_b[r].uplink_free for r in range(p)]
        assert [links_a[r].downlink_free for r in range(p)] == [links_b[r].downlink_free for r in range(p)]
        assert [max(e.end for e in b.events if e.rank == r) for r in range(p)] == b.end
        start_a, start_b = dict(enumerate(a.end)), dict(enumerate(b.end))


def test_jittered_links_are_played_through_the_link_model():
    p = 3
    topo = Topology(p, "pipelined", (1e7,) * p, (1e7,) * p,
                    {(i, j): PairLink(0.01, 0.005, 1e7) for i in range(p) for j in range(p) if i != j})
    sched = build_schedule(SimpleNamespace(name="1f1b", csv=None), p, 4)
    plain = Player(compile_schedule(sched), lambda r, a: 0.1, lambda a: 1000, None).play()
    jittered = Player(compile_schedule(sched), lambda r, a: 0.1, lambda a: 1000,
                      {r: LinkModel(topo, r, seed=1) for r in range(p)})
    assert not jittered.fixed
    assert max(jittered.play().end) > max(plain.end) + 4 * 0.01  # latency and jitter on every boundary


def test_play_runs_every_compute_in_list_order_and_each_receive_after_its_send():
    sched = build_schedule(SimpleNamespace(name="interleaved_1f1b", csv=None, virtual_stages=2), 3, 6)
    tl = play(sched, lambda r, a: 0.5 + 0.1 * r, lambda a: 100)
    for r in range(3):
        ran = [e.label for e in tl.events if e.rank == r and e.kind not in ("send", "recv_wait")]
        assert ran == [str(a) for a in sched.actions[r] if a.is_compute]
    S = sched.n_stages
    sent = {(e.peer, message_key(Action.parse(e.label), S)): e.start for e in tl.events if e.kind == "send"}
    received = [(e.rank, message_key(Action.parse(e.label), S), e.end) for e in tl.events if e.kind == "recv_wait"]
    assert len(received) == len(sent) > 0
    for rank, key, end in received:
        assert sent[(rank, key)] <= end


def test_compiling_the_same_unchanged_schedule_twice_reuses_it_and_a_changed_one_does_not():
    sched = build_schedule(SimpleNamespace(name="1f1b", csv=None), 3, 4)
    first = compile_schedule(sched)
    assert compile_schedule(sched) is first
    sched.actions[0].reverse()  # an edit in place: the schedule is checked again, and refused
    with pytest.raises(ScheduleError):
        compile_schedule(sched)


def _scrambled(rng: random.Random, sched_: Schedule) -> Schedule:
    """The schedule with a few actions of one rank moved, dropped, repeated or given another kind."""
    rows = {r: list(acts) for r, acts in sched_.actions.items()}
    for _ in range(rng.randint(1, 3)):
        acts = rows[rng.randrange(len(rows))]
        i, j = rng.randrange(len(acts)), rng.randrange(len(acts))
        how = rng.randrange(4)
        if how == 0:
            acts.insert(j, acts.pop(i))
        elif how == 1:
            del acts[i]
        elif how == 2:
            acts.insert(j, acts[i])
        else:
            acts[i] = Action(acts[i].stage, rng.choice(list(Kind)), acts[i].microbatch)
    return Schedule(sched_.name, sched_.n_stages, sched_.n_microbatches, sched_.stage_to_rank, rows)


def test_the_array_check_finds_the_broken_rule_the_action_by_action_check_names():
    """compile_schedule checks a rank's local rules as arrays and names a broken one by going through the rank
    action by action: the two must agree on every rank, or a broken schedule would pass (or a valid one fail)."""
    rng, checked, broken = random.Random(12), 0, 0
    for name, params in VARIANTS + [("interleaved_1f1b", {"virtual_stages": 3}), ("zbv", {})]:
        for p in (2, 3, 4):
            base = build_schedule(SimpleNamespace(name=name, csv=None, **params), p, 2 * p)
            for _ in range(30):
                s = _scrambled(rng, base)
                if not all(a.stage in s.stages_of(r) for r, acts in s.actions.items() for a in acts):
                    continue
                first_set = np.full(s.n_stages * s.n_microbatches * program._SLOTS, program._UNSET)
                first_set[program._ALWAYS::program._SLOTS] = -1
                for r in range(s.n_ranks):
                    found = program._rank_local(s, r, program._rank_arrays(s, r), first_set)
                    assert found == program._first_broken(s, r), (name, p, r, found)
                    checked += 1
                    broken += found[1] != 0
    assert checked > 1000 and broken > 100

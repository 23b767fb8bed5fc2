"""The step loop keeps Python's cyclic garbage collector out of the steps (lowbw.rank.loop.steps_without_gc) and
hands a step's report over when the rank next waits (lowbw.rank.loop.HeldReport)."""

from __future__ import annotations

import gc
from types import SimpleNamespace

from lowbw.rank.loop import GC_EVERY, HeldReport, steps_without_gc


def test_the_collector_is_off_during_steps_runs_every_gc_every_steps_between_them_and_is_restored():
    collected: list[int] = []

    def note(phase, info):
        if phase == "start":
            collected.append(info["generation"])

    assert gc.isenabled()
    gc.callbacks.append(note)
    try:
        with steps_without_gc() as between_steps:
            assert not gc.isenabled()
            assert gc.get_freeze_count() > 0  # what was built before the first step stays out of collections
            collected.clear()  # the collection before the first step
            for step in range(2 * GC_EVERY + 3):
                [[i] for i in range(1000)]  # garbage that would trigger the collector if it were on
                between_steps(step)
        assert collected == [1, 1]  # after steps GC_EVERY - 1 and 2 * GC_EVERY - 1, the young generations
    finally:
        gc.callbacks.remove(note)
    assert gc.isenabled() and gc.get_freeze_count() == 0


class _Reporting:
    def __init__(self):
        self.steps: list[int] = []

    def submit(self, step: int, report: dict, eval_wall_s: float) -> None:
        self.steps.append(step)


class _Executor:
    def __init__(self):
        self.chores: list = []

    def chore(self, fn) -> None:
        self.chores.append(fn)

    def wait(self) -> None:  # what the executor does at a rank's first wait of a step
        chores, self.chores = self.chores, []
        for fn in chores:
            fn()


def test_a_report_is_handed_over_at_the_next_steps_first_wait_and_never_lost_or_sent_twice():
    reporting, r = _Reporting(), SimpleNamespace(executor=_Executor())
    held = HeldReport(reporting)
    held.when_waiting(r)  # step 0: nothing held yet, no chore
    assert r.executor.chores == []
    held.hold(0, {}, 0.0)
    assert reporting.steps == []  # not beside the next step's first compute
    held.when_waiting(r)  # step 1 starts
    assert reporting.steps == []
    r.executor.wait()  # its first wait
    assert reporting.steps == [0]
    held.hold(1, {}, 0.0)
    held.when_waiting(r)
    held.hand_over()  # a checkpoint came first: handed over there, and the chore finds nothing
    r.executor.wait()
    assert reporting.steps == [0, 1]
    held.hold(2, {}, 0.0)
    held.hold(3, {}, 0.0)  # a step without a wait: the next report pushes the held one out
    held.hand_over()  # the end of the run
    held.hand_over()
    assert reporting.steps == [0, 1, 2, 3]

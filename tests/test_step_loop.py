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
    held.hold(0, {"loss_sum": 1.0}, 0.0, checked=True)
    assert reporting.steps == []  # not beside the next step's first compute
    held.when_waiting(r)  # step 1 starts
    assert reporting.steps == []
    r.executor.wait()  # its first wait
    assert reporting.steps == [0]
    held.hold(1, {"loss_sum": 1.0}, 0.0, checked=True)
    held.when_waiting(r)
    held.hand_over()  # a checkpoint came first: handed over there, and the chore finds nothing
    r.executor.wait()
    assert reporting.steps == [0, 1]
    held.hold(2, {"loss_sum": 1.0}, 0.0, checked=True)
    held.hold(3, {"loss_sum": 1.0}, 0.0, checked=True)
    held.hold(4, {"loss_sum": 1.0}, 0.0, checked=True)  # steps without a wait: the older reports are pushed out
    assert reporting.steps == [0, 1, 2, 3, 4]
    held.hand_over()  # the end of the run
    held.hand_over()
    assert reporting.steps == [0, 1, 2, 3, 4]


def test_a_report_checked_a_step_later_waits_for_its_check_and_is_dropped_if_the_run_diverged():
    reporting, r = _Reporting(), SimpleNamespace(executor=_Executor())
    held = HeldReport(reporting)
    held.hold(0, {"loss_sum": 1.0}, 0.0, checked=False)  # step 0's norm is checked at step 1's end
    held.when_waiting(r)
    r.executor.wait()  # step 1's first wait: step 0 not yet checked
    assert reporting.steps == []
    held.checked(0)  # step 1's end
    held.hold(1, {"loss_sum": float("nan")}, 0.0, checked=False)
    held.when_waiting(r)
    r.executor.wait()  # step 2's first wait: step 0 goes, step 1 waits for its check
    assert reporting.steps == [0]
    held.hand_over()  # step 1's check failed at step 2's end: the run diverged, step 1 is never handed over
    assert reporting.steps == [0]
    held.hand_over(unchecked=True)  # nor on a failure: its loss is not finite
    assert reporting.steps == [0]


def test_reports_whose_check_never_comes_are_handed_over_when_the_run_fails_or_crashes():
    reporting = _Reporting()
    held = HeldReport(reporting)
    held.hold(4, {"loss_sum": 1.0}, 0.0, checked=True)
    held.hold(5, {"loss_sum": 2.0}, 0.0, checked=False)
    held.hand_over()
    assert reporting.steps == [4]
    held.hand_over(unchecked=True)  # a peer failed during step 6, before step 5's check
    assert reporting.steps == [4, 5]


def test_the_norm_is_checked_a_step_later_only_where_nothing_but_the_next_step_reads_the_weights():
    from lowbw.rank.loop import StepSettings, checks_later

    def settings(**kw):
        base = dict(steps=10, eval_interval=0, checkpoint_every=0, batch_size=2, error_every=0, grad_clip=0.0,
                    timeout_s=60.0, lr=1e-3, crash_step=-1)
        return StepSettings(**{**base, **kw})

    one, two = SimpleNamespace(layout=SimpleNamespace(replicas=1)), SimpleNamespace(layout=SimpleNamespace(replicas=2))
    s = settings()
    assert [checks_later(one, step, s) for step in range(10)] == [True] * 9 + [False]  # the last step evaluates
    assert not any(checks_later(one, step, settings(grad_clip=1.0)) for step in range(10))  # the clip needs it first
    assert not any(checks_later(two, step, s) for step in range(10))  # replicas synchronise the weights
    evals = settings(eval_interval=4)
    assert [step for step in range(10) if not checks_later(one, step, evals)] == [3, 7, 9]
    ckpt = settings(checkpoint_every=5)
    assert [step for step in range(10) if not checks_later(one, step, ckpt)] == [4, 9]
    crash = settings(crash_step=6)  # the step before a crash is checked before its report goes
    assert [step for step in range(10) if not checks_later(one, step, crash)] == [5, 9]

"""The step loop keeps Python's cyclic garbage collector out of the steps (lowbw.rank.loop.steps_without_gc)."""

from __future__ import annotations

import gc

from lowbw.rank.loop import GC_EVERY, steps_without_gc


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

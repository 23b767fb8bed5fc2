"""The schedule registry: generator functions keyed by their ``schedule=`` name.

A generator takes (stages p, microbatches m, and any schedule fields it names, e.g.
``virtual_stages``) and returns compute-only rows plus the stage-to-rank placement (and, when some
pairs of actions run as one unit, those pairs: torch's OVERLAP_F_B); or a complete
:class:`~lowbw.pipeline.actions.Schedule` it lowered and validated itself.
"""

from __future__ import annotations

from typing import Callable, Union

from lowbw.pipeline.actions import Overlap, Rows, Schedule

Generator = Callable[..., Union[tuple[Rows, tuple[int, ...]], tuple[Rows, tuple[int, ...], frozenset[Overlap]], Schedule]]

SCHEDULES: dict[str, Generator] = {}


def register_schedule(name: str) -> Callable[[Generator], Generator]:
    """Decorator: make ``schedule=<name>`` run this generator."""
    def deco(fn: Generator) -> Generator:
        if name in SCHEDULES and SCHEDULES[name] is not fn:
            raise TypeError(f"schedule name {name!r} is taken by {SCHEDULES[name].__name__}")
        SCHEDULES[name] = fn
        return fn

    return deco

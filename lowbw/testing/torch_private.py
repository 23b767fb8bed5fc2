"""torch's private APIs that lowbw's checks use, behind one door with a version check.

lowbw proves its schedules equal torch.distributed.pipelining's by exchanging schedule CSV files
with torch, and builds torch's schedules in one process on a "fake" process group. None of that is
public torch API:

* ``_PipelineScheduleRuntime`` and its ``_dump_csv(filename, format=...)`` / ``_load_csv(filename,
  format=...)`` (``torch.distributed.pipelining.schedules``): the CSV reader and writer;
* ``torch.testing._internal.distributed.fake_pg``: importing it registers the ``"fake"`` backend
  (a process group whose collectives do nothing) and provides ``FakeStore``.

Every use goes through this module. Each function checks that the API is still there, with the
signature lowbw calls, before using it; when it is not, it raises :class:`PrivateAPIUnavailable`
with one sentence naming what is missing, the installed torch and the versions this was checked on.
Tests ask :func:`unavailable` first and skip with that sentence instead of crashing.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

#: torch releases (major.minor) on which every API below was checked to exist and behave as used.
CHECKED_ON = ("2.13",)

_SCHEDULES = "torch.distributed.pipelining.schedules"
_FAKE_PG = "torch.testing._internal.distributed.fake_pg"


class PrivateAPIUnavailable(RuntimeError):
    """A private torch API lowbw's checks rely on is missing or has changed."""


def torch_release() -> str:
    """The installed torch's ``major.minor``."""
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def checked() -> bool:
    """True when the installed torch is one of :data:`CHECKED_ON`."""
    return torch_release() in CHECKED_ON


def _sentence(what: str) -> str:
    which = "" if checked() else f" (lowbw checked its private torch APIs on torch {', '.join(CHECKED_ON)} only)"
    return (f"torch {torch.__version__}{which} has no {what}, the private torch API lowbw uses to check its "
            "schedules against torch.distributed.pipelining, so those checks cannot run here")


def _runtime_class() -> type:
    try:
        cls = getattr(importlib.import_module(_SCHEDULES), "_PipelineScheduleRuntime")
    except (ImportError, AttributeError):
        raise PrivateAPIUnavailable(_sentence(f"{_SCHEDULES}._PipelineScheduleRuntime")) from None
    for method in ("_dump_csv", "_load_csv"):
        fn = getattr(cls, method, None)
        if fn is None or "format" not in inspect.signature(fn).parameters:
            raise PrivateAPIUnavailable(_sentence(f"_PipelineScheduleRuntime.{method}(filename, format=...)"))
    return cls


def _fake_store() -> type:
    try:
        store = getattr(importlib.import_module(_FAKE_PG), "FakeStore")  # the import registers "fake"
    except (ImportError, AttributeError):
        raise PrivateAPIUnavailable(_sentence(f"{_FAKE_PG}.FakeStore")) from None
    if "fake" not in dist.Backend.backend_list:
        raise PrivateAPIUnavailable(_sentence('"fake" process-group backend'))
    return store


_CHECKS: dict[str, Callable[[], Any]] = {"csv": _runtime_class, "fake_process_group": _fake_store}


def unavailable(*needs: str) -> Optional[str]:
    """The sentence saying why the first of ``needs`` (``"csv"``, ``"fake_process_group"``) cannot be
    used with the installed torch, or None when all can."""
    for need in needs:
        try:
            _CHECKS[need]()
        except PrivateAPIUnavailable as e:
            return str(e)
    return None


@contextmanager
def fake_process_group(world_size: int) -> Iterator[int]:
    """This process as rank 0 of a ``world_size``-rank process group that communicates nothing: enough
    for torch to build pipeline stages and schedules (and dump them) without other processes."""
    store = _fake_store()
    dist.init_process_group("fake", rank=0, world_size=world_size, store=store())
    try:
        yield world_size
    finally:
        dist.destroy_process_group()


def schedule_runtime(stages: list, n_microbatches: int, loss_fn: Callable) -> Any:
    """torch's ``_PipelineScheduleRuntime`` over ``stages``: the schedule object that reads CSV files."""
    return _runtime_class()(stages, n_microbatches, loss_fn=loss_fn)


def dump_csv(torch_schedule: Any, path: str, fmt: str) -> None:
    """Write a torch schedule's action lists (``fmt``: ``compute_only`` or ``compute_comms``) to ``path``."""
    _runtime_class()
    if not hasattr(torch_schedule, "_dump_csv"):
        raise PrivateAPIUnavailable(_sentence(f"{type(torch_schedule).__name__}._dump_csv"))
    torch_schedule._dump_csv(str(path), format=fmt)


def load_csv(runtime: Any, path: str, fmt: str) -> None:
    """Have a :func:`schedule_runtime` read a schedule CSV (``fmt``: ``compute_only`` or ``compute_comms``;
    torch lowers a compute-only file to sends and receives itself)."""
    _runtime_class()
    runtime._load_csv(str(path), format=fmt)


def dump_torch_schedule(cls_name: str, p: int, m: int, rank_stages: list[int], n_stages: int, path: str,
                        fmt: str = "compute_comms") -> None:
    """Build torch's schedule class ``cls_name`` for ``p`` ranks and ``m`` microbatches on a fake process
    group (``rank_stages``: the stage indices rank 0 holds, of ``n_stages``) and dump its CSV to ``path``.

    The action lists do not depend on the stages' modules (placeholders here); every rank's row is written."""
    from torch.distributed.pipelining import PipelineStage  # here: a slow import only schedule checks need
    import torch.distributed.pipelining.schedules as schedules

    cls = getattr(schedules, cls_name)
    with fake_process_group(p):
        stages = [PipelineStage(torch.nn.Linear(2, 2), s, n_stages, torch.device("cpu")) for s in rank_stages]
        single = len(rank_stages) == 1 and cls_name in ("ScheduleGPipe", "Schedule1F1B")
        sched = cls(stages[0] if single else stages, m, loss_fn=lambda out, target: out.sum())
        dump_csv(sched, path, fmt)

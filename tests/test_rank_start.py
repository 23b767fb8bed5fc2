"""Ranks start as forks of a fork server that imported torch and lowbw once, in the environment the
starting process has now (not the one the server was started with)."""

import multiprocessing as mp
import os
from pathlib import Path

import pytest

from lowbw.launch import rank_context
from lowbw.testing.spawn import spawned_group

MARK = "LOWBW_TEST_RANK_START_MARK"


def _record(rank: int, world: int, port: int, out: str) -> None:
    import sys

    (Path(out) / f"rank{rank}.txt").write_text(
        f"{os.environ.get(MARK, '')}\n{int('torch' in sys.modules)}\n{os.getppid()}\n")


def _group() -> list[list[str]]:
    with spawned_group(_record, 2, (), 120, "environment check") as out:
        return [(out / f"rank{r}.txt").read_text().split("\n")[:3] for r in range(2)]


@pytest.mark.skipif("forkserver" not in mp.get_all_start_methods(), reason="the platform has no fork server")
def test_ranks_fork_from_a_preloaded_server_and_see_the_environment_set_after_it_started(monkeypatch):
    assert rank_context().get_start_method() == "forkserver"
    monkeypatch.setenv(MARK, "first")
    first = _group()  # starts the fork server (unless an earlier test did) with MARK=first at most
    monkeypatch.setenv(MARK, "second")
    second = _group()
    assert [m for m, _, _ in first] == ["first", "first"] and [m for m, _, _ in second] == ["second", "second"]
    assert all(t == "1" for _, t, _ in first + second)  # torch was imported before the rank's own code ran
    assert all(int(ppid) != os.getpid() for _, _, ppid in first + second)  # a fork of the server, not of us

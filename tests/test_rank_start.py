"""Ranks start as forks of the fork server (which imported torch and lowbw once), in the environment
the starting process has now (not the one the server was started with)."""

import multiprocessing as mp
import os
from pathlib import Path

import pytest

from lowbw.launch import rank_context
from lowbw.testing.spawn import spawned_group

MARK = "LOWBW_TEST_RANK_START_MARK"


def _record(rank: int, world: int, port: int, out: str) -> None:
    (Path(out) / f"rank{rank}.txt").write_text(f"{os.environ.get(MARK, '')}\n{os.getppid()}\n")


def _group() -> list[list[str]]:
    with spawned_group(_record, 2, (), 120, "environment check") as out:
        return [(out / f"rank{r}.txt").read_text().split("\n")[:2] for r in range(2)]


@pytest.mark.skipif("forkserver" not in mp.get_all_start_methods(), reason="the platform has no fork server")
def test_ranks_fork_from_the_server_and_see_the_environment_set_after_it_started(monkeypatch):
    assert rank_context().get_start_method() == "forkserver"
    monkeypatch.setenv(MARK, "first")
    first = _group()  # starts the fork server (unless an earlier test did) with MARK=first at most
    monkeypatch.setenv(MARK, "second")
    second = _group()
    assert [m for m, _ in first] == ["first", "first"] and [m for m, _ in second] == ["second", "second"]
    assert all(int(ppid) != os.getpid() for _, ppid in first + second)  # a fork of the server, not a child of ours

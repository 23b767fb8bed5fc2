"""A finished run is never overwritten; resume refuses other settings before any process starts."""

from __future__ import annotations

import json

import pytest

from lowbw.checkpoint import MAY_CHANGE_ON_RESUME, check_resume_config
from lowbw.errors import ConfigError
from lowbw.launch import RunFailed
from lowbw.train import run

TINY = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "progress=false",
        "pipeline.stages=2", "train.eval_batches=1", "net=ideal", "clock=virtual", "clock.durations=fixed",
        "checkpoint.every=1"]


def _files(d):
    return {p: p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_resume_names_every_setting_that_differs_and_allows_only_those_that_may_change():
    old = {"model": {"n_embd": 64, "n_layer": 4}, "train": {"steps": 10, "lr": 1e-3}, "timeout_s": 60, "seed": 1}
    check_resume_config(old, {**old, "train": {"steps": 20, "lr": 1e-3}, "timeout_s": 5})  # may change
    new = {**old, "model": {"n_embd": 128, "n_layer": 4}, "seed": 2}
    with pytest.raises(ConfigError, match=r"model.n_embd=64 \(now 128\), seed=1 \(now 2\)"):
        check_resume_config(old, new)
    assert "train.steps" in MAY_CHANGE_ON_RESUME and "train.lr" not in MAY_CHANGE_ON_RESUME


def test_resuming_a_finished_run_with_another_width_is_refused_before_anything_changes(compose, tmp_path):
    run(compose(TINY + ["train.steps=2"]), tmp_path)
    before = _files(tmp_path)
    with pytest.raises(ConfigError, match=r"model.n_embd=32 \(now 64\)"):
        run(compose(TINY + ["train.steps=4", "resume=true", "model.n_embd=64"]), tmp_path)
    with pytest.raises(ConfigError, match=r"pipeline.stages=2 \(now 1\)"):
        run(compose(TINY + ["train.steps=4", "resume=true", "pipeline.stages=1", "model.n_layer=2"]), tmp_path)
    with pytest.raises(ConfigError, match="already holds a completed run of 2 steps"):
        run(compose(TINY + ["train.steps=2", "resume=true"]), tmp_path)
    assert _files(tmp_path) == before  # not a byte changed


def test_a_later_run_that_fails_in_a_finished_runs_folder_leaves_the_finished_run_whole(compose, tmp_path):
    done = run(compose(TINY + ["train.steps=2"]), tmp_path)
    finished = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    # resume it for more steps, and crash on the way: the finished run is kept in attempt1/
    with pytest.raises(RunFailed):
        run(compose(TINY + ["train.steps=4", "resume=true", "faults.crash_rank=1", "faults.crash_step=3"]), tmp_path)
    kept = tmp_path / "attempt1"
    assert json.loads((kept / "summary.json").read_text()) == done
    assert {n: (kept / n).read_bytes() for n in finished} == finished
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"
    # a fresh run into the folder that fails moves that attempt aside in turn
    with pytest.raises(RunFailed):
        run(compose(TINY + ["train.steps=3", "faults.crash_rank=0", "faults.crash_step=1"]), tmp_path)
    assert json.loads((kept / "summary.json").read_text()) == done
    assert json.loads((tmp_path / "attempt2" / "summary.json").read_text())["status"] == "failed"

"""Divergence is a result, not a success; train.grad_clip clips the norm of all stages' gradients together."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lowbw.errors import EXIT_DIVERGED
from lowbw.testing.processes import outputs_complete
from lowbw.train import run

TINY = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "progress=false",
        "train.eval_batches=1", "net=ideal", "clock=virtual", "clock.durations=fixed"]


@pytest.mark.parametrize("steps", [6, 2], ids=["checked_during_the_next_step", "checked_at_once_on_the_last_step"])
def test_a_diverging_run_stops_with_status_diverged_the_step_and_exit_code_4(tmp_path, steps):
    # Step 1 diverges. With 6 steps its gradient norm is checked during step 2 (lowbw.rank.loop.checks_later),
    # with 2 it is the last step's, checked before the evaluation: the same outcome either way.
    out = subprocess.run([sys.executable, "-m", "lowbw.train", *TINY, "pipeline.stages=2", f"train.steps={steps}",
                          "train.lr=1e30", f"out_dir={tmp_path}/run"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    run_dir = tmp_path / "run"
    assert out.returncode == EXIT_DIVERGED, out.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_step"] == 1  # step 0's update blew the weights
    assert summary["steps_completed"] == 1 and summary["last_step"] == 0
    assert "training diverged at step 1" in summary["error"] and "lower train.lr" in summary["error"]
    assert "Traceback" not in out.stderr and "run diverged" in out.stderr
    assert outputs_complete(run_dir) == []  # and so no NaN or Infinity in any JSON file
    for f in run_dir.rglob("*.json*"):
        assert "NaN" not in f.read_text() and "Infinity" not in f.read_text(), f


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grad_clip_clips_the_global_norm_across_stages_as_one_process_does(compose, tmp_path):
    # One stage in one process is the reference: its gradient norm is the global one by definition.
    # Two stages clipping each its own norm would train differently from it; the global clip does not.
    clip = ["train.grad_clip=0.05", "train.steps=4", "train.lr=3e-2"]
    run(compose(TINY + clip + ["pipeline.stages=1"]), tmp_path / "one")
    run(compose(TINY + clip + ["pipeline.stages=2"]), tmp_path / "two")
    run(compose(TINY + ["train.steps=4", "train.lr=3e-2", "pipeline.stages=2"]), tmp_path / "unclipped")
    one, two, unclipped = (_losses(tmp_path / d) for d in ("one", "two", "unclipped"))
    assert two == pytest.approx(one, rel=1e-5)
    assert unclipped[0] == pytest.approx(two[0], rel=1e-6)  # the first loss comes before any update
    # clipping changed the training, by far more than the tolerance two stages match one process within
    assert abs(unclipped[-1] - two[-1]) > 20 * 1e-5 * abs(two[-1])

"""Golden numbers: one short run per schedule, pinned to the values the code produced when they were recorded.

A change that is meant to keep behaviour (a refactor, a faster executor) must keep these: the same losses,
the same step times on the virtual clock and the same bytes on every link. Timing and bytes are compared
bit for bit (FLOP-based durations and payload lengths do not depend on floating-point rounding); losses to
1e-6 relative, because another CPU's vector units may round a matmul differently.

A change that is *meant* to move a number (a new default, a fixed bug) regenerates the file and says why
in its commit:

    LOWBW_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lowbw.train import compose, run

GOLDEN = Path(__file__).parent / "golden" / "runs.json"
REGEN = bool(os.environ.get("LOWBW_REGEN_GOLDEN"))

TINY = ["model.arch=gpt2", "model.n_layer=4", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "progress=false",
        "clock=virtual", "clock.durations=flops", "train.steps=3", "train.batch_size=8", "train.eval_batches=1",
        "train.eval_interval=2", "net=home", "net.jitter_ms=3", "hardware=rtx4090", "regime=none"]

CASES = {
    "gpipe": ["schedule=gpipe", "pipeline.stages=4"],
    "1f1b": ["schedule=1f1b", "pipeline.stages=4"],
    "interleaved_1f1b": ["schedule=interleaved_1f1b", "pipeline.stages=2", "schedule.virtual_stages=2"],
    "zb_h1": ["schedule=zb_h1", "pipeline.stages=3", "model.n_layer=3"],
    "pipedream_2bw": ["schedule=pipedream_2bw", "pipeline.stages=2"],
    "1f1b_int8_topk": ["schedule=1f1b", "pipeline.stages=2", "compress/fwd=int8", "compress/bwd=topk",
                       "compress.bwd.ratio=0.1"],
    "gpipe_fixed_global": ["schedule=gpipe", "pipeline.stages=4", "clock.durations=fixed", "net=global"],
}


def _numbers(summary: dict, run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "loss": [r["loss"] for r in rows],
        "val_loss": [r.get("val_loss") for r in rows],
        "step_time_s": [r["step_time_s"] for r in rows],
        "busy_s": [r["busy_s"] for r in rows],
        "bytes_per_link": [r["bytes_per_link"] for r in rows],
    }


@pytest.fixture(scope="module")
def golden() -> dict:
    return {} if REGEN else json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_short_runs_reproduce_their_golden_numbers(case, golden, tmp_path):
    summary = run(compose(TINY + CASES[case]), tmp_path)
    assert summary["status"] == "completed"
    got = _numbers(summary, tmp_path)
    if REGEN:
        data = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        data[case] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        return
    want = golden[case]
    assert got["step_time_s"] == want["step_time_s"]
    assert got["busy_s"] == want["busy_s"]
    assert got["bytes_per_link"] == want["bytes_per_link"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert [v is None for v in got["val_loss"]] == [v is None for v in want["val_loss"]]
    assert [v for v in got["val_loss"] if v is not None] == pytest.approx(
        [v for v in want["val_loss"] if v is not None], rel=1e-6)

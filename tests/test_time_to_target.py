"""Time and energy to a target loss: first crossing and interpolation on hand-made loss curves, the running
totals they read, and a real run that records them."""

import json

import pytest

from lowbw.errors import ConfigError
from lowbw.metrics.target import Elapsed, time_to_target
from lowbw.train import run
from lowbw.validation import validate


def curve(val_losses: dict[int, float], steps: int = 10, tokens: int = 100, step_s: float = 2.0,
          wall_s: float = 0.5, j_per_step: float = 10.0) -> list[dict]:
    """Metrics rows of a run whose steps each take step_s on its clock, wall_s of wall time and j_per_step."""
    rows = []
    for k in range(steps):
        r = {"step": k, "tokens": tokens, "elapsed_s": step_s * (k + 1), "elapsed_wall_s": wall_s * (k + 1),
             "elapsed_j": j_per_step * (k + 1)}
        if k in val_losses:
            r["val_loss"] = val_losses[k]
        rows.append(r)
    return rows


def test_first_crossing_is_the_first_evaluation_at_or_below_the_target_with_its_totals():
    rows = curve({1: 4.0, 3: 3.0, 5: 2.5, 7: 1.9, 9: 1.5})
    t = time_to_target(rows, 2.0)
    assert t["reached"] and t["evaluations"] == 5
    assert t["first_crossing"] == {"step": 7, "tokens": 800, "time_s": 16.0, "wall_s": 4.0, "energy_j": 80.0,
                                   "val_loss": 1.9}
    assert t["best_val_loss"] == 1.5 and t["best_step"] == 9


def test_a_loss_equal_to_the_target_counts_as_reached():
    t = time_to_target(curve({1: 3.0, 3: 2.0, 5: 1.0}), 2.0)
    assert t["first_crossing"]["step"] == 3
    assert t["interpolated"]["step"] == pytest.approx(3.0)  # the target lies exactly at the crossing


def test_interpolation_is_linear_in_the_loss_drop_between_the_bracketing_evaluations():
    # 2.5 at step 5, 1.9 at step 7: the target 2.0 lies 5/6 of the way down -> step 5 + 5/6 * 2
    t = time_to_target(curve({1: 4.0, 3: 3.0, 5: 2.5, 7: 1.9}), 2.0)
    f = (2.5 - 2.0) / (2.5 - 1.9)
    got = t["interpolated"]
    assert got["step"] == pytest.approx(5 + 2 * f)
    assert got["tokens"] == pytest.approx(600 + 200 * f)
    assert got["time_s"] == pytest.approx(12.0 + 4.0 * f)
    assert got["wall_s"] == pytest.approx(3.0 + 1.0 * f)
    assert got["energy_j"] == pytest.approx(60.0 + 20.0 * f)
    assert got["time_s"] < t["first_crossing"]["time_s"]  # the first crossing is an upper bound


def test_uneven_steps_are_interpolated_between_the_totals_not_by_step_count():
    rows = curve({0: 3.0, 2: 1.0}, steps=3)
    rows[1]["elapsed_s"], rows[2]["elapsed_s"] = 10.0, 30.0  # step 1 and 2 were slow on the run clock
    t = time_to_target(rows, 2.0)  # halfway down from step 0 (2 s) to step 2 (30 s)
    assert t["interpolated"]["time_s"] == pytest.approx(16.0)
    assert t["interpolated"]["step"] == pytest.approx(1.0)


def test_a_crossing_at_the_first_evaluation_has_no_interpolation():
    t = time_to_target(curve({4: 1.5, 9: 1.0}), 2.0)
    assert t["first_crossing"]["step"] == 4 and t["interpolated"] is None


def test_a_run_that_never_reaches_the_target_records_its_best_loss():
    t = time_to_target(curve({3: 3.0, 6: 2.4, 9: 2.6}), 2.0)
    assert not t["reached"] and t["first_crossing"] is None and t["interpolated"] is None
    assert (t["best_val_loss"], t["best_step"]) == (2.4, 6)


def test_a_noisy_curve_counts_its_first_crossing_not_a_later_one():
    t = time_to_target(curve({1: 3.0, 3: 1.9, 5: 2.2, 7: 1.8}), 2.0)
    assert t["first_crossing"]["step"] == 3


def test_running_totals_price_cumulative_busy_time_span_and_bytes():
    priced = []

    def price(busy, span, links):
        priced.append((list(busy), span, dict(links)))
        return 7.0 * span + sum(busy) + sum(links.values())

    e = Elapsed(2, price)
    rows = [{"step_time_wall_s": 0.5, "busy_s": [1.0, 2.0], "bytes_per_link": {"0->1": 10}},
            {"step_time_wall_s": 0.25, "busy_s": [4.0, 1.0], "bytes_per_link": {"0->1": 5, "1->0": 3}}]
    first = e.add(rows[0], 3.0)
    second = e.add(rows[1], 6.0)
    assert first == {"elapsed_s": 3.0, "elapsed_wall_s": 0.5, "elapsed_j": 7 * 3.0 + 3.0 + 10}
    assert priced[1] == ([5.0, 3.0], 6.0, {"0->1": 15, "1->0": 3})
    assert second["elapsed_wall_s"] == 0.75
    # busy time beyond the span (a rank that started its next step early) is priced as the span
    e.add({"step_time_wall_s": 0.0, "busy_s": [10.0, 0.0], "bytes_per_link": {}}, 7.0)
    assert priced[-1][0] == [7.0, 3.0]
    rows[0]["elapsed_s"], rows[1]["elapsed_s"] = 3.0, 6.0
    e.replay(rows)  # a resumed run rebuilds the totals from the rows it keeps
    assert (e.busy, e.wall_s, e.links) == ([5.0, 3.0], 0.75, {"0->1": 15, "1->0": 3})


def test_a_target_without_validation_during_training_is_refused(compose):
    with pytest.raises(ConfigError, match="train.eval_interval"):
        validate(compose(["train.target_loss=2.0", "train.eval_interval=0"]))
    with pytest.raises(ConfigError, match="train.target_loss"):
        validate(compose(["train.target_loss=-1", "train.eval_interval=5"]))


def test_a_run_records_when_it_reached_its_target_from_its_own_metrics(compose, tmp_path):
    cfg = compose(["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "pipeline.stages=2",
                   "train.steps=6", "train.eval_interval=2", "train.eval_batches=1", "train.target_loss=5.3",
                   "progress=false"])
    s = run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert s["target"] == json.loads(json.dumps(time_to_target(rows, 5.3)))
    assert s["target"]["evaluations"] == 3
    # the totals count from the start: the run clock's last end, every step's wall time, joules >= the window's
    assert rows[-1]["elapsed_s"] == pytest.approx(sum(r["step_time_s"] for r in rows), rel=1e-12)
    assert rows[-1]["elapsed_wall_s"] == pytest.approx(sum(r["step_time_wall_s"] for r in rows), rel=1e-12)
    assert rows[-1]["elapsed_j"] > s["energy"]["total_j"] > 0  # the summary's energy leaves the warm-up step out
    assert [r["elapsed_j"] for r in rows] == sorted(r["elapsed_j"] for r in rows)

"""Compression in training: int8 both ways costs (almost) nothing; an aggressive codec costs loss."""

import json
import math

import pytest
from test_codecs import int8_wire_ratio

from lowbw.train import run

# The tiny default model in 2 stages, long enough for codecs to matter, timing irrelevant (ideal links);
# network energy by the intensity model, which prices bytes whatever the link (ideal's own link class is free).
# Measured durations: codec work is charged what it took (planned FLOP durations charge codecs nothing).
BASE = ["pipeline.stages=2", "net=ideal", "clock=virtual", "clock.durations=measured", "train.steps=120",
        "train.eval_batches=8",
        "train.eval_interval=0", "progress=false", "train.lr=3e-3", "energy=intensity"]


@pytest.fixture(scope="module")
def uncompressed(tmp_path_factory):
    from lowbw.train import compose

    d = tmp_path_factory.mktemp("none")
    return run(compose(BASE), d), d


def test_int8_both_directions_ends_within_2_percent_of_uncompressed_loss(compose, tmp_path, uncompressed):
    ref, ref_dir = uncompressed
    s = run(compose(BASE + ["compress/fwd=int8", "compress/bwd=int8", f"compress.baseline_run={ref_dir}"]), tmp_path)
    assert abs(s["val_loss"] - ref["val_loss"]) / ref["val_loss"] < 0.02
    assert s["loss_gap"] == pytest.approx(s["val_loss"] - ref["val_loss"])
    # every message is one microbatch's boundary tensor; the ratio is the payload layout's, exactly
    cfg = compose(BASE)
    shape = (cfg.train.batch_size // cfg.pipeline.microbatches, cfg.model.block_size, cfg.model.n_embd)
    raw, int8 = int8_wire_ratio(shape)
    assert ref["bytes_sent"] * int8 == s["bytes_sent"] * raw
    # network energy under the intensity model follows the bytes: int8 cuts it to about a quarter
    assert s["energy"]["network_j"] / ref["energy"]["network_j"] == pytest.approx(
        s["bytes_sent"] / ref["bytes_sent"], rel=1e-9)
    for key in ("0.fwd", "0.bwd"):
        c = s["compression"][key]
        assert c["ratio"] == pytest.approx(4 * math.prod(shape) / int8, rel=1e-12)  # raw tensor bytes / wire bytes
        assert 0 < c["rel_error"] < 0.02
        assert c["encode_s"] > 0 and c["decode_s"] > 0
    assert ref["compression"]["0.fwd"]["rel_error"] == 0.0 and ref["compression"]["0.fwd"]["ratio"] < 1.0
    # codec work is compute of the rank that does it: in its busy time, on its timeline
    events = [json.loads(line) for line in open(tmp_path / "timeline.jsonl")]
    last = max(e["step"] for e in events)
    for rank in (0, 1):
        mine = [e for e in events if e["rank"] == rank and e["step"] == last]
        codec_s = sum(e["end"] - e["start"] for e in mine if e["kind"] in ("encode", "decode"))
        busy = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][last]["busy_s"][rank]
        assert 0 < codec_s < busy


def test_an_aggressive_codec_shows_a_measurably_worse_loss(compose, tmp_path, uncompressed):
    ref, _ = uncompressed
    s = run(compose(BASE + ["compress/fwd=int2", "compress/bwd=int2"]), tmp_path)
    assert s["val_loss"] - ref["val_loss"] > 0.05, (s["val_loss"], ref["val_loss"])
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert metrics[-1]["compression"]["0.fwd"]["rel_error"] > 0.3


def test_bad_codec_settings_are_rejected_before_spawning(compose):
    from lowbw.validation import validate
    from lowbw.errors import ConfigError

    for overrides, match in [
        (["compress/bwd=topk", "compress.bwd.ratio=1.5"], "compress.bwd: .*ratio"),
        (["compress/fwd=quant", "compress.fwd.bits=3"], "compress.fwd: .*bits"),
        (["compress/fwd=powersgd", "compress.fwd.rank=0"], "compress.fwd: .*rank"),
        (["compress.fwd.name=gzip"], "compress.fwd: unknown codec 'gzip'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            validate(compose(overrides))


def test_codec_time_is_not_reported_as_zero_where_planned_durations_charge_it_nothing(compose, tmp_path):
    from lowbw.metrics.recorder import format_summary

    s = run(compose(["pipeline.stages=2", "net=ideal", "train.steps=2", "train.eval_batches=1", "progress=false",
                     "compress/fwd=int8"]), tmp_path)  # the default clock: virtual, durations=flops
    assert s["timing"]["durations"] == "flops"
    c = s["compression"]["0.fwd"]
    assert c["messages"] > 0 and c["ratio"] > 3 and c["encode_s"] is None and c["decode_s"] is None
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(r["compression"]["0.fwd"]["encode_s"] is None for r in rows)
    text = format_summary(s)
    assert "codec time not charged" in text and "encode 0.00 ms" not in text

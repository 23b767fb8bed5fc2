"""Injected faults cost what they should; checkpoints make a crashed run resumable, step for step."""

import json

import pytest

from lowbw.config import BandwidthWalkConfig, FaultsConfig, NetConfig, OutageConfig
from lowbw.errors import ConfigError
from lowbw.launch import RunFailed
from lowbw.net.conditions import MATHIS_C, conditions_from_config
from lowbw.net.link import LinkModel
from lowbw.net.topology import Topology
from lowbw.train import run

TINY = ["model.n_layer=4", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "progress=false",
        "pipeline.stages=2", "train.eval_batches=1"]


def link(faults=None, n=2, **net):
    net_cfg = NetConfig(**{"latency_ms": 10.0, "uplink_mbps": 8.0, "downlink_mbps": 8.0, **net})
    cond = conditions_from_config(faults or FaultsConfig(), net_cfg, n)
    return LinkModel(Topology.from_config(net_cfg, n), 0, conditions=cond)


def test_an_outage_delays_exactly_the_messages_that_start_inside_it():
    faults = FaultsConfig(outages=[OutageConfig(link="0->1", start_s=1.0, end_s=3.0)])
    # each probe alone on a fresh link: 1000 bytes at 8 Mbit/s = 1 ms on the wire, + 10 ms latency
    for t in (0.0, 0.5, 0.998, 3.0, 3.5):
        assert link(faults).send(1, 1000, t).arrival == pytest.approx(t + 0.011)
    for t in (1.0, 2.0, 2.999):
        assert link(faults).send(1, 1000, t).arrival == pytest.approx(3.0 + 0.011)


def test_an_outage_on_one_link_leaves_the_others_alone():
    faults = FaultsConfig(outages=[OutageConfig(link="0->1", start_s=0.0, end_s=5.0)])
    lm = link(faults, n=3)
    assert lm.send(2, 1000, 1.0).arrival == pytest.approx(1.011)


def test_packet_loss_caps_bandwidth_at_the_mathis_ceiling():
    # 1% loss, 10 ms one way -> RTT 20 ms: 1460 B * 8 / 0.02 s * 1.2247 / 0.1 = 7.15 Mbit/s < 8 Mbit/s
    lm = link(loss_rate=0.01)
    ceiling = 8 * 1460 / 0.020 * MATHIS_C / 0.1
    assert ceiling == pytest.approx(7.154e6, rel=1e-3)
    timing = lm.send(1, 1_000_000, 0.0)
    assert timing.tx_done == pytest.approx(8e6 / ceiling)
    assert link(loss_rate=0.0001).send(1, 1_000_000, 0.0).tx_done == pytest.approx(1.0)  # ceiling above 8 Mbit/s


def test_a_bandwidth_trace_sets_the_rate_in_force_when_a_message_starts(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("time_s,factor\n0,1.0\n10,0.5\n20,0.25\n")
    lm = link(FaultsConfig(bandwidth_trace=str(trace)))
    assert lm.send(1, 1_000_000, 0.0).tx_done == pytest.approx(1.0)
    assert lm.send(1, 1_000_000, 15.0).tx_done == pytest.approx(17.0)
    assert lm.send(1, 1_000_000, 25.0).tx_done == pytest.approx(29.0)


@pytest.mark.parametrize("text,match", [
    ("time,factor\n0,1\n", "first line must be the header"),
    ("time_s,factor\n0,1\n5,abc\n", "line 3: expected two numbers"),
    ("time_s,factor\n0,1\n5,-1\n", "line 3: times must increase"),
    ("time_s,mbps\n5,10\n2,10\n", "line 3: times must increase"),
    ("time_s,factor\n", "no rows"),
])
def test_a_trace_file_with_bad_rows_is_rejected_naming_the_line(tmp_path, text, match):
    trace = tmp_path / "trace.csv"
    trace.write_text(text)
    with pytest.raises(ConfigError, match=match):
        link(FaultsConfig(bandwidth_trace=str(trace)))


def test_a_random_bandwidth_walk_is_seeded_and_bounded():
    walk = BandwidthWalkConfig(enabled=True, seed=4, interval_s=1.0, sigma=0.5, min_factor=0.2, max_factor=1.0, horizon_s=100)
    a = conditions_from_config(FaultsConfig(bandwidth_walk=walk), NetConfig(), 2)
    b = conditions_from_config(FaultsConfig(bandwidth_walk=walk), NetConfig(), 2)
    assert a.trace_v == b.trace_v and min(a.trace_v) >= 0.2 and max(a.trace_v) <= 1.0 and len(set(a.trace_v)) > 10


def test_a_stragglers_slowdown_matches_the_configured_factor(compose, tmp_path):
    cfg = compose(TINY + ["clock=virtual", "clock.durations=fixed", "net=ideal", "train.steps=2",
                          "faults.straggler_rank=1", "faults.straggler_factor=3"])
    run(cfg, tmp_path)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    for row in rows:
        assert row["busy_s"][1] == pytest.approx(3 * row["busy_s"][0])


# Stateful codecs too: their state (error-feedback residuals) must survive the checkpoint.
RESUMABLE = TINY + ["clock=virtual", "clock.durations=flops", "net=home", "net.jitter_ms=5", "train.steps=6",
                    "checkpoint.every=2", "compress/fwd=int8", "compress/bwd=topk", "compress.bwd.ratio=0.1"]


def _rows(path):
    return [json.loads(line) for line in open(path / "metrics.jsonl")]


def test_a_crashed_run_resumed_from_its_checkpoint_matches_an_uninterrupted_run(compose, tmp_path):
    whole = run(compose(RESUMABLE), tmp_path / "whole")
    crashed = tmp_path / "crashed"
    with pytest.raises(RunFailed):
        run(compose(RESUMABLE + ["faults.crash_rank=1", "faults.crash_step=5"]), crashed)
    assert len(_rows(crashed)) == 5  # every completed step kept
    resumed = run(compose(RESUMABLE + ["resume=true"]), crashed)  # checkpoint after step 3: reruns 4 and 5
    assert resumed["status"] == "completed"
    a, b = _rows(tmp_path / "whole"), _rows(crashed)
    assert [r["step"] for r in b] == list(range(6))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # step for step
    assert [r["step_time_s"] for r in a] == [r["step_time_s"] for r in b]  # clock and links resumed too
    assert resumed["val_loss"] == whole["val_loss"]


def test_a_corrupted_checkpoint_is_a_clear_error_and_nothing_is_overwritten(compose, tmp_path):
    run(compose(TINY + ["clock=virtual", "net=ideal", "train.steps=2", "checkpoint.every=1"]), tmp_path)
    newest = sorted((tmp_path / "checkpoints" / "rank1").glob("step*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=f"checkpoint {newest} cannot be read.*corrupted or truncated"):
        run(compose(TINY + ["clock=virtual", "net=ideal", "train.steps=4", "checkpoint.every=1", "resume=true"]),
            tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before

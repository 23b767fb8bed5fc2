"""Replicas of the pipeline (lowbw.replicas): layout, the collectives over emulated links, the methods.

Unit checks run the replica group's collectives with ranks as threads on the in-memory wire (the real
transport and link model above it); the method checks run real 2 stages x 2 replicas runs.
"""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from lowbw.checkpoint import load, steps
from lowbw.compress.base import build_codec
from lowbw.errors import ConfigError
from lowbw.net.clock import make_clock
from lowbw.net.link import LinkModel
from lowbw.net.topology import Topology
from lowbw.net.transport import CH_FWD, Transport
from lowbw.net.wire import MemoryWire, Switchboard
from lowbw.rank.build import build_stages
from lowbw.replicas import Layout, build_sync
from lowbw.replicas.collective import Averager, Exchange, ReplicaGroup, gather_bytes, ring_bytes
from lowbw.replicas.per_tensor import PerTensor
from lowbw.launch import RunFailed
from lowbw.models.flops import n_params
from lowbw.train import run
from lowbw.validation import validate

TINY = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "pipeline.stages=2",
        "pipeline.microbatches=2", "train.batch_size=4", "train.eval_interval=0", "train.eval_batches=1",
        "progress=false", "net=home", "clock=virtual", "energy.meter=none"]


def test_replica_j_holds_ranks_j_times_s_to_j_times_s_plus_s_minus_1():
    lay = Layout(pipeline_ranks=3, replicas=2)
    assert lay.world == 6
    assert [lay.replica_of(g) for g in range(6)] == [0, 0, 0, 1, 1, 1]
    assert [lay.pipeline_rank(g) for g in range(6)] == [0, 1, 2, 0, 1, 2]
    assert lay.group(4) == [1, 4] and lay.base(4) == 3
    assert lay.describe(4) == "rank 4 (replica 1, pipeline rank 1)" and Layout(3).describe(2) == "rank 2"


def _groups(compose, n_ranks: int, members: list[int]):
    """Transports and replica groups of ``members`` (ranks as threads, in-memory wire, virtual clock), on
    links of 20 Mbit/s up, 1 Gbit/s down, no latency."""
    net = compose(["net=ideal", "net.uplink_mbps=20", "net.downlink_mbps=1000", "net.latency_ms=0"]).net
    board = Switchboard()
    topo = Topology.from_config(net, n_ranks)
    out = {}
    for r in range(n_ranks):
        clock = make_clock("virtual", torch.device("cpu"))
        t = Transport(r, LinkModel(topo, r), clock, 30.0, MemoryWire(board, r))
        out[r] = (t, clock, ReplicaGroup(t, clock, members, r, planned=0.0) if r in members else None)
    return out


def _threads(fns: dict[int, object]) -> dict[int, object]:
    results, errors = {}, []

    def go(r, fn):
        try:
            results[r] = fn()
        except BaseException as e:  # noqa: BLE001 -- re-raised below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(r, fn)) for r, fn in fns.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("n", [1, 5, 1000])
def test_ring_all_reduce_gives_every_member_the_same_mean(compose, n):
    members = [0, 1, 2]
    groups = _groups(compose, 3, members)
    xs = {r: torch.randn(n, generator=torch.Generator().manual_seed(r)) for r in members}
    want = (xs[0] + xs[1] + xs[2]) / 3

    def reduce(r):
        x = xs[r].clone()
        groups[r][2].all_reduce_mean(x)
        return x

    got = _threads({r: (lambda r=r: reduce(r)) for r in members})
    assert torch.allclose(got[0], want, atol=1e-6)
    assert all(torch.equal(got[0], got[r]) for r in members)  # the same bits: replicas stay equal
    sent = {r: sum(groups[r][2].take_events()[1].values()) for r in members}
    assert sum(sent.values()) == ring_bytes(n, 3) == 2 * (3 - 1) * 4 * n
    # each member's hops as lowbw-simulate replays them
    assert all(sent[r] == sum(Exchange("ring", n).hops(3, i)) for i, r in enumerate(members))


def test_all_gather_through_a_codec_averages_the_decoded_payloads_on_every_member(compose):
    members = [0, 1]
    groups = _groups(compose, 2, members)
    xs = {r: torch.randn(4096, generator=torch.Generator().manual_seed(10 + r)) for r in members}
    shapes = [(64, 32), (2048,)]
    averagers = {r: Averager(groups[r][2], {"name": "int8", "block": 64}, shapes) for r in members}

    def reduce(r):
        x = xs[r].clone()
        averagers[r](x)
        return x

    got = _threads({r: (lambda r=r: reduce(r)) for r in members})
    want = (xs[0] + xs[1]) / 2
    assert torch.equal(got[0], got[1])
    assert (got[0] - want).norm() / want.norm() < 0.02  # int8 blocks of 64: about 0.5 % (docs/compression.md)
    payload = averagers[0].encoder.nbytes
    assert payload == sum(build_codec({"name": "int8", "block": 64}).payload_nbytes(s, torch.float32) for s in shapes)
    sent = sum(sum(groups[r][2].take_events()[1].values()) for r in members)
    method = build_sync({"name": "allreduce", "codec": {"name": "int8", "block": 64}})
    assert sent == gather_bytes(payload, 2) == method.group_bytes_per_step(shapes, 2, 0)


def test_pipeline_and_replica_traffic_contend_for_one_uplink(compose):
    # rank 0 sends a pipeline message to rank 1, then averages with rank 2 over the same 20 Mbit/s uplink:
    # the replica message leaves only after the pipeline message, so it arrives that much later
    n_floats, pipeline_bytes = 25_000, 250_000  # 100 kB of sync, 250 kB of activations

    def arrival(with_pipeline: bool) -> float:
        g = _groups(compose, 3, [0, 2])
        t0 = g[0][0]
        if with_pipeline:
            g[1][0].expect(0, CH_FWD, (0, 0, 1, 0), pipeline_bytes)

        def rank0():
            if with_pipeline:
                t0.send(1, CH_FWD, (0, 0, 1, 0), torch.zeros(pipeline_bytes, dtype=torch.uint8))
            g[0][2].all_reduce_mean(torch.ones(n_floats))

        def rank1():
            if with_pipeline:
                g[1][0].recv(0, CH_FWD, (0, 0, 1, 0))

        def rank2():
            g[2][2].all_reduce_mean(torch.ones(n_floats))
            return g[2][1].now()

        return _threads({0: rank0, 1: rank1, 2: rank2})[2]

    alone, shared = arrival(False), arrival(True)
    assert shared - alone == pytest.approx(pipeline_bytes * 8 / 20e6, rel=1e-9)


@pytest.mark.parametrize("spec,match", [
    ({"name": "gossip"}, "replicas/sync='gossip' is not a synchronisation method"),
    ({"name": "allreduce", "every": 3}, "replicas/sync=allreduce has no parameter 'every'"),
    ({"name": "diloco", "every": 0}, "replicas.sync.every=0 must be a whole number"),
    ({"name": "diloco", "outer_momentum": 1.0}, "replicas.sync.outer_momentum=1.0 must lie in"),
    ({"name": "sparta", "fraction": 0.0}, "replicas.sync.fraction=0.0 must lie in"),
    ({"name": "allreduce", "codec": "aqsgd"}, "replicas.sync.codec=aqsgd: its payload length is not known"),
    ({"name": "allreduce", "codec": "zip"}, "unknown codec 'zip'"),
])
def test_bad_sync_settings_are_refused_naming_the_setting(spec, match):
    with pytest.raises(ConfigError, match=match):
        build_sync(spec)


def test_replicas_of_an_asynchronous_schedule_and_too_many_processes_are_refused_before_spawning(compose):
    with pytest.raises(ConfigError, match="replicas.count=2 with schedule=pipedream_2bw"):
        validate(compose(TINY + ["replicas.count=2", "schedule=pipedream_2bw"]))
    with pytest.raises(ConfigError, match=r"replicas.count=0 must be an integer in \[1, 256\]"):
        validate(compose(TINY + ["replicas.count=0"]))
    with pytest.raises(ConfigError, match="replicas.count=200 x pipeline.stages=2 = 400 processes, more than"):
        validate(compose(TINY + ["replicas.count=200"]))
    with pytest.raises(ConfigError, match="2 x replicas.count=2 = 4 processes, but 2 were started"):
        validate(compose(TINY + ["replicas.count=2"]), world_size=2)
    with pytest.raises(ConfigError, match="replicas/sync=diloco has no parameter 'fraction'"):
        validate(compose(TINY + ["replicas.count=2", "replicas/sync=diloco", "+replicas.sync.fraction=0.1"]))


# ---- real runs: 2 stages x 2 replicas -----------------------------------------------------------------

def _run(compose, tmp_path, name: str, overrides: list[str]) -> tuple[dict, list[dict], dict]:
    """(summary, metrics rows, final weights by "rank.stage.param") of a run that checkpoints its last step."""
    run_dir = tmp_path / name
    steps_ = next(int(o.split("=")[1]) for o in overrides if o.startswith("train.steps="))
    cfg = compose(TINY + overrides + [f"out_dir={run_dir}", f"checkpoint.every={steps_}", "checkpoint.keep=1"])
    summary = run(cfg, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = {}
    root = run_dir / "checkpoints"
    for r in range(summary["world_size"]):
        state = load(root, r, steps(root, r)[-1])
        for s, sd in state["model"].items():
            weights.update({f"{r}.{s}.{k}": v for k, v in sd.items()})
    return summary, rows, weights


def _replica(weights: dict, r0: int, stages: int) -> dict:
    """Replica of ranks r0..r0+stages-1, keyed as replica 0's ranks."""
    out = {}
    for k, v in weights.items():
        r, rest = k.split(".", 1)
        if r0 <= int(r) < r0 + stages:
            out[f"{int(r) - r0}.{rest}"] = v
    return out


def _close(a: dict, b: dict, tol: float) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-12)) for k in a)
    assert worst < tol, worst
    return worst


SGD = ["train.steps=3", "replicas.count=2", "train.optimizer=sgd", "train.lr=0.5"]


@pytest.fixture(scope="module")
def data_parallel(tmp_path_factory):
    """One 2 x 2 all-reduce run with SGD (its update is the gradient, so weights compare gradients: AdamW
    divides near-zero gradients by their own size and turns float rounding into differences of 1e-4)."""
    from lowbw.train import compose

    return _run(compose, tmp_path_factory.mktemp("dp"), "dp", SGD)


def _stage_shapes(compose, overrides: list[str]) -> list[list[tuple[int, ...]]]:
    """Per pipeline rank, the shapes of its parameters."""
    cfg = compose(TINY + overrides)
    plan = validate(cfg)
    return [[tuple(q.shape) for st in build_stages(cfg, plan, p, torch.device("cpu")).values()
             for q in st.module.parameters()] for p in range(plan.schedule.n_ranks)]


def _check_formula(compose, s: dict, rows: list[dict], overrides: list[str]) -> None:
    """Each step's replica bytes are the method's formula for the run's parameters."""
    method = build_sync(dict(s["sync"]))
    want = [sum(method.group_bytes_per_step(shapes, 2, r["step"]) for shapes in _stage_shapes(compose, overrides))
            for r in rows]
    assert [r["sync_bytes_sent"] for r in rows] == want and s["sync_bytes_sent"] == sum(want) > 0
    assert s["sync_bytes_per_token"] == pytest.approx(sum(want) / s["tokens"])
    # charged on the links between a stage's replicas, beside the pipeline's own links
    assert {"0->2", "2->0", "1->3", "3->1"} <= set(s["bytes_per_link"])
    assert s["bytes_sent"] > s["sync_bytes_sent"]


def test_allreduce_replicas_train_as_one_pipeline_on_the_combined_batch(compose, tmp_path, data_parallel):
    s, rows, w = data_parallel
    one, one_rows, w1 = _run(compose, tmp_path, "one", SGD[:1] + SGD[2:] + ["train.batch_size=8",
                                                                             "pipeline.microbatches=4"])
    assert s["status"] == "completed" and s["world_size"] == 4 and s["tokens"] == one["tokens"]
    for a, b in zip(rows, one_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert s["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)  # validated on the same text
    _close(_replica(w, 0, 2), w1, 1e-5)
    assert _replica(w, 0, 2).keys() == _replica(w, 2, 2).keys()
    assert all(torch.equal(_replica(w, 0, 2)[k], _replica(w, 2, 2)[k]) for k in w1)  # replicas stay equal
    _check_formula(compose, s, rows, SGD)  # the ring: 2 (R - 1) x 4 bytes per parameter a step


def test_diloco_with_one_inner_step_outer_lr_1_and_no_momentum_is_data_parallel(compose, tmp_path, data_parallel):
    _, dp_rows, dp = data_parallel
    _, di_rows, di = _run(compose, tmp_path, "diloco", SGD + [
        "replicas/sync=diloco", "replicas.sync.every=1", "replicas.sync.outer_lr=1.0",
        "replicas.sync.outer_momentum=0.0"])
    for a, b in zip(di_rows, dp_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    _close(di, dp, 1e-5)


@pytest.mark.parametrize("sync", [
    ["replicas/sync=allreduce", "replicas.sync.codec=powersgd"],
    ["replicas/sync=sparta", "replicas.sync.fraction=0.01"],
])  # the ring: above; DiLoCo through int8 (a gather every other step): in the resume test
def test_replica_bytes_equal_the_formula_of_each_method(compose, tmp_path, sync):
    overrides = ["train.steps=2", "replicas.count=2", *sync]
    s, rows, _ = _run(compose, tmp_path, "run", overrides)
    _check_formula(compose, s, rows, overrides)


def test_one_replica_changes_nothing(compose, tmp_path):
    a, rows_a, wa = _run(compose, tmp_path, "plain", ["train.steps=2"])
    b, rows_b, wb = _run(compose, tmp_path, "r1", ["train.steps=2", "replicas.count=1", "replicas/sync=diloco",
                                                    "replicas.sync.every=1"])
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert [r["step_time_s"] for r in rows_a] == [r["step_time_s"] for r in rows_b]
    assert a["sync_bytes_sent"] == 0 and a["bytes_sent"] == b["bytes_sent"] - b["sync_bytes_sent"]
    assert math.isclose(a["val_loss"], b["val_loss"], rel_tol=1e-6)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_per_tensor_error_feedback_delays_what_a_lossy_codec_drops_instead_of_losing_it():
    # PowerSGD at rank 1 on a rank-4 matrix loses much of one message; with the residual carried, the
    # messages delivered add up to the inputs less what is still owed (e_T = T x - sum of decoded)
    shapes = [(64, 32), (32,)]
    g = torch.Generator().manual_seed(0)
    x = torch.cat([(torch.randn(64, 4, generator=g) @ torch.randn(4, 32, generator=g)).reshape(-1),
                   torch.randn(32, generator=g)])
    spec = {"name": "powersgd", "rank": 1}
    sender, receiver = PerTensor(spec, shapes), PerTensor(spec, shapes)
    assert sender.feedback and sender.nbytes < 4 * x.numel()
    total = receiver.decode(sender.encode(x))
    once = float((total - x).norm() / x.norm())
    for _ in range(49):
        total += receiver.decode(sender.encode(x))
    assert torch.allclose(total + sender.residual, 50 * x, atol=1e-3 * float(x.abs().max()))
    late = float((total / 50 - x).norm() / x.norm())
    assert once > 0.1 and late < once / 5, (once, late)
    assert not PerTensor({"name": "topk", "ratio": 0.1}, shapes).feedback  # top-k carries its own residual


def test_a_resumed_diloco_run_continues_exactly(compose, tmp_path):
    # the checkpoint after step 2 falls inside a DiLoCo round (H = 2 ends rounds at steps 1 and 3): the
    # round's start, the outer momentum and the int8 residuals must come back for the same numbers
    sync = ["replicas.count=2", "replicas/sync=diloco", "replicas.sync.every=2", "replicas.sync.codec=int8"]
    common = TINY + sync
    whole = tmp_path / "whole"
    s = run(compose(common + ["train.steps=5", f"out_dir={whole}"]), whole)
    cut = tmp_path / "cut"
    run(compose(common + ["train.steps=3", "checkpoint.every=1", f"out_dir={cut}"]), cut)
    run(compose(common + ["train.steps=5", "checkpoint.every=1", "resume=true", f"out_dir={cut}"]), cut)
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (whole, cut)]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]
    assert [r["step_time_s"] for r in rows[0]] == [r["step_time_s"] for r in rows[1]]
    _check_formula(compose, s, rows[0], sync)  # int8 payloads gathered at steps 1 and 3, nothing between


def test_a_crashed_replica_is_named_by_rank_replica_and_pipeline_rank(compose, tmp_path):
    run_dir = tmp_path / "crash"
    cfg = compose(TINY + ["replicas.count=2", "train.steps=4", "faults.crash_rank=3", "faults.crash_step=1",
                          f"out_dir={run_dir}"])
    with pytest.raises(RunFailed, match=r"rank 3 .*\[rank 3 \(replica 1, pipeline rank 1\)\]") as err:
        run(cfg, run_dir)
    assert err.value.rank == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_rank"] == 3 and "replica 1" in summary["error"]


@pytest.mark.parametrize("sync", [
    ["replicas/sync=allreduce"],
    ["replicas/sync=diloco", "replicas.sync.every=2", "replicas.sync.codec=int8"],
    ["replicas/sync=sparta"],
])
def test_lowbw_simulate_with_replicas_gives_the_regime_runs_step_times(compose, tmp_path, sync):
    # a tiny GPT learning in gpt_1b's regime on 2 stages x 2 replicas, and lowbw-simulate of gpt_1b itself
    from lowbw.simulate import compose as sim_compose
    from lowbw.simulate import simulate

    shape = ["pipeline.stages=2", "pipeline.microbatches=2", "train.batch_size=4", "replicas.count=2", "net=home",
             "hardware=rtx4090", *sync]
    run_dir = tmp_path / "run"
    s = run(compose(TINY + shape + ["train.steps=4", "regime=gpt_1b", f"out_dir={run_dir}"]), run_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sim = simulate(sim_compose(shape + ["model=gpt_1b", "sim.steps=4", "sim.picture_steps=0"]))
    assert [r["step_time_s"] for r in rows] == pytest.approx([r["step_time_s"] for r in sim["per_step"]], rel=1e-9)
    assert [r["bytes_sent"] for r in rows] == [r["bytes_sent"] for r in sim["per_step"]]  # every hop the target's
    assert s["energy"]["j_per_token"] == pytest.approx(sim["energy"]["j_per_token"], rel=1e-9)
    assert sim["replicas"] == 2 and sim["sync_bytes_per_token"] > 0
    if sync == ["replicas/sync=allreduce"]:  # the ring of gpt_1b: 2 (R - 1) x 4 bytes per target parameter
        target = compose(["regime=gpt_1b"]).regime.model
        assert rows[0]["sync_bytes_sent"] == 2 * (2 - 1) * 4 * n_params(target)

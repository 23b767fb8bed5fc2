"""Schedules beyond 1F1B: validity on every shape, published bubble formulas, gradients, CSV interop."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbw.errors import ConfigError, ScheduleError
from lowbw.pipeline.actions import Action, Kind, Schedule
from lowbw.pipeline.schedules import SCHEDULES, build_schedule
from lowbw.pipeline.player import play, validate_schedule
from lowbw.testing import torch_private
from lowbw.testing.activations_held import in_flight

# (name, params) of every generated training schedule; interleaved with two chunk counts.
VARIANTS = [
    ("gpipe", {}),
    ("1f1b", {}),
    ("zb_h1", {}),
    ("interleaved_1f1b", {"virtual_stages": 2}),
    ("interleaved_1f1b", {"virtual_stages": 3}),
    ("zbv", {}),
    ("dualpipev", {}),
]


def make(name: str, p: int, m: int, **params) -> Schedule:
    return build_schedule(SimpleNamespace(name=name, csv=None, **params), p, m)


def is_valid_shape(name: str, p: int, m: int) -> bool:
    if name == "dualpipev":
        return m >= 2 * p  # a microbatch per chunk in flight
    return name != "interleaved_1f1b" or m % p == 0  # Megatron's rule for interleaving


def chunks(name: str, params: dict) -> int:
    """Model chunks (stages) per rank."""
    return 2 if name in ("zbv", "dualpipev") else params.get("virtual_stages", 1)


# Published setting: T_F = T_B = T_W (full backward = T_B + T_W); interleaved chunks take 1/v of a stage.
def unit_durations(v: int = 1):
    table = {Kind.FORWARD: 1.0, Kind.FULL_BACKWARD: 2.0, Kind.BACKWARD_INPUT: 1.0, Kind.BACKWARD_WEIGHT: 1.0}
    return lambda rank, a: table[a.kind] / v


def idle(sched: Schedule, v: int = 1) -> tuple[float, float]:
    """(idle fraction of rank-seconds, idle seconds per rank) of one step played with unit durations."""
    tl = play(sched, unit_durations(v))
    span = max(e.end for e in tl.events)
    busy = sum(tl.busy(r) for r in range(sched.n_ranks))
    return 1.0 - busy / (sched.n_ranks * span), span - busy / sched.n_ranks


# ---- every schedule, every shape ------------------------------------------------------------


def test_every_schedule_validates_for_2_to_8_stages_and_1_to_16_microbatches():
    checked = 0
    for name, params in VARIANTS:
        for p in range(2, 9):
            for m in range(1, 17):
                if not is_valid_shape(name, p, m):
                    continue
                sched = make(name, p, m, **params)  # build_schedule validates: no deadlock, all sends matched
                assert sched.n_ranks == p
                assert sched.n_stages == p * chunks(name, params)
                checked += 1
    assert checked > 300


@settings(max_examples=40, deadline=None)
@given(
    variant=st.sampled_from(VARIANTS),
    p=st.integers(2, 8),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_schedules_never_deadlock_whatever_the_durations(variant, p, k, seed):
    """Deadlock-freedom is structural: random compute times and link delays never block a schedule."""
    import random

    from lowbw.net.link import LinkModel
    from lowbw.net.topology import PairLink, Topology

    name, params = variant
    m = k * 2 * p if name == "dualpipev" else k * p
    sched = make(name, p, m, **params)
    rng = random.Random(seed)
    pairs = {(i, j): PairLink(rng.uniform(0, 0.1), 0.0, rng.uniform(1e6, 1e9)) for i in range(p) for j in range(p) if i != j}
    topo = Topology(p, "pipelined", (1e9,) * p, (1e9,) * p, pairs)
    links = {r: LinkModel(topo, r) for r in range(p)}
    times = {}
    tl = play(sched, lambda r, a: times.setdefault((r, a), rng.uniform(0.01, 1.0)), lambda a: 1000, links)
    # every compute action ran once, in list order on its rank
    for r in range(p):
        ran = [e.label for e in tl.events if e.rank == r and e.kind not in ("send", "recv_wait")]
        assert ran == [str(a) for a in sched.actions[r] if a.is_compute]


def test_interleaved_needs_microbatches_divisible_by_stages():
    with pytest.raises(ConfigError, match="divisible"):
        make("interleaved_1f1b", 4, 6, virtual_stages=2)


def test_interleaved_needs_a_layer_per_chunk(compose):
    from lowbw.validation import validate

    with pytest.raises(ConfigError, match="model.n_layer=4"):
        validate(compose(["schedule=interleaved_1f1b", "pipeline.stages=4", "model.n_layer=4"]))
    validate(compose(["schedule=interleaved_1f1b", "pipeline.stages=2", "model.n_layer=4"]))


def test_interleaved_places_stage_s_on_rank_s_mod_p():
    sched = make("interleaved_1f1b", 4, 8, virtual_stages=3)
    assert sched.stage_to_rank == tuple(s % 4 for s in range(12))
    assert sched.stages_of(1) == [1, 5, 9]


def test_schedule_fields_reach_only_the_generators_that_take_them():
    # virtual_stages is a field of every schedule config; gpipe/1f1b/zb_h1 ignore it.
    for name in ("gpipe", "1f1b", "zb_h1"):
        assert make(name, 3, 4, virtual_stages=2).n_stages == 3


@pytest.mark.parametrize("p,m", [(4, 8), (6, 12), (8, 16), (4, 2)])
def test_activation_memory_in_flight_matches_the_papers(p, m):
    g, f, z = make("gpipe", p, m), make("1f1b", p, m), make("zb_h1", p, m)
    for r in range(p):
        assert in_flight(g, r) == m
        assert in_flight(f, r) == min(m, p - r)
        assert in_flight(z, r) <= min(m, p)  # ZB-H1: never more than 1F1B's worst rank
    assert max(in_flight(z, r) for r in range(p)) == max(in_flight(f, r) for r in range(p))


# ---- bubbles ---------------------------------------------------------------------------------


@pytest.mark.parametrize("p,m", [(2, 1), (2, 8), (4, 4), (4, 16), (8, 8), (8, 16), (3, 5)])
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_gpipe_and_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1(name, p, m):
    frac, _ = idle(make(name, p, m))
    assert abs(frac - (p - 1) / (m + p - 1)) < 0.02


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 4, 2), (4, 8, 2), (4, 8, 4), (8, 16, 2), (3, 9, 3)])
def test_interleaved_bubble_shrinks_by_the_number_of_chunks(p, m, v):
    frac, _ = idle(make("interleaved_1f1b", p, m, virtual_stages=v), v)
    assert abs(frac - (p - 1) / (v * m + p - 1)) < 0.02
    assert frac < idle(make("1f1b", p, m))[0]


@pytest.mark.parametrize("p,m", [(2, 4), (4, 4), (4, 8), (4, 16), (8, 8), (8, 24), (6, 12)])
def test_zb_h1_bubble_is_a_third_of_1f1b_with_equal_f_b_w(p, m):
    zb_frac, zb_idle = idle(make("zb_h1", p, m))
    f_frac, f_idle = idle(make("1f1b", p, m))
    # Qi et al. 2024: ZB-H1 bubble (p-1)(T_F + T_B - T_W) against 1F1B's (p-1)(T_F + T_B + T_W)
    assert abs(zb_idle - (p - 1) * (1 + 1 - 1)) < 1e-9
    assert abs(f_idle - (p - 1) * (1 + 1 + 1)) < 1e-9
    assert abs(zb_idle / f_idle - 1 / 3) < 0.02  # a third of 1F1B's bubble (idle seconds per rank)
    assert zb_frac < f_frac
    assert abs(zb_frac - (p - 1) / (3 * m + p - 1)) < 0.02


# ---- gradients ---------------------------------------------------------------------------------


def test_interleaved_and_zb_h1_gradients_equal_single_process_gradients():
    from lowbw.testing.gradcheck import Scenario, pipeline_grads, reference_grads

    scenarios = [
        Scenario("interleaved_1f1b", stages=2, n_layer=4, params={"virtual_stages": 2}),
        Scenario("interleaved_1f1b", stages=2, n_layer=7, microbatches=2, partition=[2, 1, 1, 1, 1, 1],
                 params={"virtual_stages": 3}),
        Scenario("interleaved_1f1b", stages=4, n_layer=8, params={"virtual_stages": 2}),
        Scenario("zb_h1", stages=2, n_layer=3, partition=[2, 1]),
        Scenario("zb_h1", stages=4, n_layer=4, microbatches=8),
        Scenario("zb_h1", stages=4, n_layer=5, microbatches=2),
    ]
    torch.set_num_threads(1)
    for sc, got in zip(scenarios, pipeline_grads(scenarios)):
        want = reference_grads(sc)
        assert got.keys() == want.keys(), sc
        for name in want:
            assert got[name] is not None, (sc, name)
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{sc} {name}: {m}")


# ---- CSV: lowbw <-> torch.distributed.pipelining ------------------------------------------------


@pytest.mark.parametrize("name,params", VARIANTS)
@pytest.mark.parametrize("compute_only", [False, True])
def test_csv_round_trip_gives_the_same_schedule(tmp_path, name, params, compute_only):
    sched = make(name, 4, 8, **params)
    path = tmp_path / "s.csv"
    sched.to_csv(path, compute_only=compute_only)
    back = Schedule.from_csv(path)
    assert back.actions == sched.actions
    assert back.stage_to_rank == sched.stage_to_rank
    assert (back.n_stages, back.n_microbatches) == (sched.n_stages, sched.n_microbatches)


def test_csv_schedule_runs_through_the_config(tmp_path):
    path = tmp_path / "zb.csv"
    make("zb_h1", 3, 6).to_csv(path)
    sched = build_schedule(SimpleNamespace(name="csv", csv=str(path)), 3, 6)
    assert sched.actions == make("zb_h1", 3, 6).actions


@pytest.mark.parametrize("rank, cell, named", [
    (0, "0F0", "rank 0 never runs 0F0 (stage 0's forward of microbatch 0)"),
    (1, "1F0", "rank 1 never runs 1F0 (stage 1's forward of microbatch 0)"),
    (1, "1B3", "rank 1 never runs 1B3 (stage 1's backward of microbatch 3; or 1I3 and 1W3)"),
])
def test_a_csv_missing_an_action_is_refused_naming_the_missing_action(tmp_path, rank, cell, named):
    path = tmp_path / "missing.csv"
    make("1f1b", 2, 4).to_csv(path, compute_only=True)
    rows = path.read_text().splitlines()
    rows[rank] = ",".join(c for c in rows[rank].split(",") if c != cell)
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(ScheduleError) as info:
        build_schedule(SimpleNamespace(name="csv", csv=str(path)), 2, 4)
    assert str(info.value) == named + "; every stage needs it for every microbatch"


def test_a_csv_missing_a_weight_gradient_names_it(tmp_path):
    path = tmp_path / "missing_w.csv"
    make("zb_h1", 2, 4).to_csv(path, compute_only=True)
    rows = path.read_text().splitlines()
    rows[0] = ",".join(c for c in rows[0].split(",") if c != "0W2")
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(ScheduleError, match=r"rank 0 never runs 0W2 \(stage 0's weight gradient of microbatch 2, after 0I2\)"):
        build_schedule(SimpleNamespace(name="csv", csv=str(path)), 2, 4)


def test_csv_reader_skips_torch_bookkeeping_actions(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("0UNSHARD,0F0,0SEND_F0,0RECV_B0,0B0,0REDUCE_GRAD\n1UNSHARD,1RECV_F0,1F0,1B0,1SEND_B0,\n")
    sched = Schedule.from_csv(path)
    assert [str(a) for a in sched.actions[0]] == ["0F0", "0SEND_F0", "0RECV_B0", "0B0"]
    validate_schedule(sched)


# torch's CSV reader/writer and its "fake" process group are private APIs: lowbw.testing.torch_private
# checks they are still there; without them these tests skip, saying what torch lacks.
TORCH_PRIVATE_MISSING = torch_private.unavailable("csv", "fake_process_group")
needs_torch_private = pytest.mark.skipif(TORCH_PRIVATE_MISSING is not None, reason=TORCH_PRIVATE_MISSING or "")


@pytest.fixture(scope="module")
def fake_group():
    """A 4-rank 'fake' process group in this process: enough for torch to build and dump schedules."""
    with torch_private.fake_process_group(4) as world:
        yield world


def _torch_stages(p: int, v: int, placed: list[int] | None = None):
    """Rank 0's stages as torch builds them: chunk c is stage c * p, unless ``placed`` names them."""
    from torch.distributed.pipelining import PipelineStage

    placed = placed or [c * p for c in range(v)]
    return [PipelineStage(torch.nn.Linear(2, 2), s, p * v, torch.device("cpu")) for s in placed]


def _loss(out, target):
    return out.sum()


@needs_torch_private
@pytest.mark.parametrize("torch_cls,name,v", [
    ("ScheduleInterleaved1F1B", "interleaved_1f1b", 2),
    ("ScheduleInterleaved1F1B", "interleaved_1f1b", 3),
    ("ScheduleInterleavedZeroBubble", "zb_h1", 1),
])
@pytest.mark.parametrize("m", [4, 8, 12])
def test_torch_dumped_csv_loads_in_lowbw_as_the_same_schedule(tmp_path, fake_group, torch_cls, name, v, m):
    import torch.distributed.pipelining.schedules as ts

    p = fake_group
    torch_sched = getattr(ts, torch_cls)(_torch_stages(p, v), m, loss_fn=_loss)
    params = {"virtual_stages": v} if name == "interleaved_1f1b" else {}
    mine = make(name, p, m, **params)
    for fmt in ("compute_comms", "compute_only"):
        path = tmp_path / f"torch_{fmt}.csv"
        torch_private.dump_csv(torch_sched, path, fmt)
        theirs = Schedule.from_csv(path)
        validate_schedule(theirs)
        assert theirs.actions == mine.actions, fmt  # same order, receives placed where lowbw waits for them
        assert max(e.end for e in play(theirs).events) == max(e.end for e in play(mine).events)


@needs_torch_private
@pytest.mark.parametrize("name,params", VARIANTS)
def test_lowbw_csv_loads_in_torch(tmp_path, fake_group, name, params):
    p, v = fake_group, chunks(name, params)
    mine = make(name, p, 8, **params)
    for compute_only in (False, True):
        path = tmp_path / f"mine_{compute_only}.csv"
        mine.to_csv(path, compute_only=compute_only)
        rt = torch_private.schedule_runtime(_torch_stages(p, v, mine.stages_of(0)), 8, _loss)
        torch_private.load_csv(rt, path, "compute_only" if compute_only else "compute_comms")
        assert rt.stage_index_to_group_rank == dict(enumerate(mine.stage_to_rank))
        back = tmp_path / f"back_{compute_only}.csv"
        torch_private.dump_csv(rt, back, "compute_comms")  # torch's own lowering of our schedule
        assert Schedule.from_csv(back).actions == mine.actions


def test_missing_private_torch_api_is_named_in_one_sentence_with_the_versions_checked(monkeypatch):
    import torch.distributed.pipelining.schedules as ts  # here, not at the top: a slow import few tests need

    monkeypatch.setattr(torch, "__version__", "9.1.0")
    monkeypatch.setattr(ts._PipelineScheduleRuntime, "_load_csv", lambda self, filename: None)  # format= gone
    why = torch_private.unavailable("csv")
    assert why is not None and why.count(". ") == 0
    assert "torch 9.1.0" in why and "_PipelineScheduleRuntime._load_csv(filename, format=...)" in why
    assert f"torch {', '.join(torch_private.CHECKED_ON)} only" in why  # the versions it was checked on
    with pytest.raises(torch_private.PrivateAPIUnavailable, match="_load_csv"):
        torch_private.schedule_runtime([], 1, _loss)
    monkeypatch.delattr(ts, "_PipelineScheduleRuntime")
    assert "pipelining.schedules._PipelineScheduleRuntime" in torch_private.unavailable("csv")
    monkeypatch.setattr(torch_private, "_FAKE_PG", "torch.testing._internal.distributed.no_such_module")
    assert "FakeStore" in torch_private.unavailable("fake_process_group")


def test_registered_schedules_include_the_new_ones():
    assert {"gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zbv", "dualpipev"} <= set(SCHEDULES)
    assert str(Action(3, Kind.BACKWARD_WEIGHT, 2)) == "3W2"

"""The validator and the executor agree: whatever the validator accepts, the executor runs -- at the
times the validator's player predicts.

Every registered schedule generator at 2..6 ranks and 1..12 microbatches, plus per-rank orders
shuffled at random (hypothesis), goes through lowbw.validation.validate (generators by name,
shuffled orders as schedule=csv) and, when accepted, through the real executor and transport on
every rank at once (lowbw.testing.inproc: ranks as threads, an in-memory wire), on the virtual
clock with fixed durations over links with latency and finite bandwidth. Each compute action must
start and end on its rank's clock exactly when lowbw.pipeline.player.play says it does.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from lowbw.errors import ConfigError, ScheduleError
from lowbw.net.link import LinkModel
from lowbw.compress.payload import packed_size
from lowbw.pipeline.actions import Action, Kind, Schedule
from lowbw.pipeline.durations import action_seconds
from lowbw.pipeline.schedules import SCHEDULES
from lowbw.pipeline.player import play
from lowbw.testing.inproc import run_inproc
from lowbw.validation import validate

F, B, I, W = Kind.FORWARD, Kind.FULL_BACKWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT
PARAMS = {"interleaved_1f1b": {"virtual_stages": 2}}
# the virtual clock with planned durations; links of 25 ms and 20/100 Mbit/s (net=home)
BASE = ["model.n_embd=8", "model.n_head=1", "model.block_size=4", "clock=virtual", "clock.durations=fixed",
        "clock.forward_s=0.01", "clock.backward_s=0.02", "net=home", "net.jitter_ms=2", "progress=false",
        "energy.meter=none", "timeout_s=60"]


@pytest.fixture(scope="module")
def base_cfg():
    from lowbw.train import compose

    return compose(BASE)


def configure(cfg, schedule: dict, p: int, m: int, n_layer: int, steps: int = 1):
    """Set the module's config to this case (one config, changed in place: building one costs ~0.3 s)."""
    cfg.schedule.name, cfg.schedule.csv = schedule["name"], schedule.get("csv")
    cfg.schedule.virtual_stages = schedule.get("virtual_stages", 1)
    cfg.pipeline.stages, cfg.pipeline.microbatches, cfg.train.batch_size = p, m, m
    cfg.model.n_layer, cfg.train.steps = n_layer, steps
    return cfg


COMPUTE_EVENTS = ("forward", "backward", "backward_input", "backward_weight")


def predicted(cfg, plan, steps: int) -> dict[tuple[int, str], tuple[float, float]]:
    """(rank, action) -> (start, end) of every compute action of ``steps`` steps, played by the validator's
    player (steps one after the other: each rank starts a step where it ended the last; an asynchronous
    schedule as its unrolled schedule over all steps, microbatches numbered batch * m + i)."""
    sched = plan.schedule.unrolled(steps) if plan.schedule.asynchronous else plan.schedule
    links = {r: LinkModel(plan.topology, r, seed=cfg.seed, conditions=plan.conditions) for r in range(sched.n_ranks)}
    row = packed_size([(torch.float32, (1, cfg.model.block_size, cfg.model.n_embd))])  # codec none, one sequence
    fwd, bwd = cfg.clock.forward_s, cfg.clock.backward_s
    out, start = {}, {}
    for step in range(1 if plan.schedule.asynchronous else steps):
        tl = play(sched, lambda r, a: action_seconds(a.kind, fwd, bwd), lambda a: row, links, start, step)
        for e in tl.events:
            if e.kind in COMPUTE_EVENTS:
                out[(e.rank, f"{step}:{e.label}")] = (e.start, e.end)
        start = {r: max(e.end for e in tl.events if e.rank == r) for r in range(sched.n_ranks)}
    return out


def executed(outcomes, plan) -> dict[tuple[int, str], tuple[float, float]]:
    """The same, from the executor's own events on each rank's virtual clock."""
    m, out = plan.schedule.n_microbatches, {}
    for o in outcomes:
        for res in o.results:
            for e in res.events:
                if e.kind not in COMPUTE_EVENTS:
                    continue
                if plan.schedule.asynchronous:  # window microbatch -> batch * m + i, as unrolled() numbers it
                    a = Action.parse(e.label)
                    label = f"0:{Action(a.stage, a.kind, max(e.step - 1, 0) * m + a.microbatch)}"
                else:
                    label = f"{e.step}:{e.label}"
                out[(e.rank, label)] = (e.start, e.end)
    return out


def run_and_compare(cfg, plan) -> None:
    want = predicted(cfg, plan, cfg.train.steps)
    got = executed(run_inproc(cfg, plan, timeout_s=120), plan)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-12), k


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_generator_that_validates_runs_in_the_executor_at_the_validators_times(name, base_cfg):
    torch.set_num_threads(1)
    ran = 0
    for p in range(2, 7):
        for m in range(1, 13):
            chunks = 2 if name in ("interleaved_1f1b", "zbv", "dualpipev") else 1
            steps = 2 if name == "pipedream_2bw" else 1  # two steps: microbatches in flight across the boundary
            cfg = configure(base_cfg, {"name": name, **PARAMS.get(name, {})}, p, m, chunks * p, steps)
            try:
                plan = validate(cfg)
            except (ConfigError, ScheduleError):
                continue  # the shape is not one this schedule takes (e.g. interleaved needs m % p == 0)
            run_and_compare(cfg, plan)
            ran += 1
    # the fewest: interleaved_1f1b takes m % p == 0 only, 17 of the 60 shapes
    assert ran >= 17, f"{name}: only {ran} shapes validated"


# ---- shuffled orders ------------------------------------------------------------------------------


def _ready(a: Action, done: set, last: int) -> bool:
    s, mb = a.stage, a.microbatch
    if a.kind == F:
        return s == 0 or (F, s - 1, mb) in done
    if a.kind in (B, I):
        grad_in = s == last or (B, s + 1, mb) in done or (I, s + 1, mb) in done
        return (F, s, mb) in done and grad_in
    return (I, s, mb) in done  # W


def random_linearization(sched: Schedule, rng: random.Random) -> dict[int, list[Action]]:
    """Each rank's compute actions in the order of a random global order that respects every data
    dependency: valid by construction, so the validator must accept it."""
    remaining = {r: [a for a in acts if a.is_compute] for r, acts in sched.actions.items()}
    out: dict[int, list[Action]] = {r: [] for r in remaining}
    done: set = set()
    while any(remaining.values()):
        r, a = rng.choice([(r, a) for r, acts in remaining.items() for a in acts if _ready(a, done, sched.n_stages - 1)])
        remaining[r].remove(a)
        out[r].append(a)
        done.add((a.kind, a.stage, a.microbatch))
    return out


def random_local_order(sched: Schedule, rng: random.Random) -> dict[int, list[Action]]:
    """Each rank's compute actions shuffled keeping only what one rank can see (a forward before its
    backward, I before W): often a deadlock, which the validator must refuse."""
    out = {}
    for r, acts in sched.actions.items():
        remaining, order, done = [a for a in acts if a.is_compute], [], set()
        while remaining:
            cands = [a for a in remaining if a.kind == F or (a.kind in (B, I) and (F, a.stage, a.microbatch) in done)
                     or (a.kind == W and (I, a.stage, a.microbatch) in done)]
            a = rng.choice(cands)
            remaining.remove(a)
            order.append(a)
            done.add((a.kind, a.stage, a.microbatch))
        out[r] = order
    return out


SYNC = [n for n in sorted(SCHEDULES) if n != "pipedream_2bw"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(SYNC), p=st.integers(2, 6), k=st.integers(1, 2), seed=st.integers(0, 2**31),
       valid=st.booleans())
def test_shuffled_orders_the_validator_accepts_run_at_its_times(name, p, k, seed, valid, base_cfg, tmp_path_factory):
    torch.set_num_threads(1)
    chunks = 2 if name in ("interleaved_1f1b", "zbv", "dualpipev") else 1
    m = k * 2 * p if name == "dualpipev" else k * p
    cfg = configure(base_cfg, {"name": name, **PARAMS.get(name, {})}, p, m, chunks * p)
    source = validate(cfg).schedule
    rng = random.Random(seed)
    rows = (random_linearization if valid else random_local_order)(source, rng)
    path = tmp_path_factory.mktemp("shuffled") / "order.csv"
    Schedule("shuffled", source.n_stages, m, source.stage_to_rank, rows).to_csv(path, compute_only=True)
    cfg = configure(cfg, {"name": "csv", "csv": str(path)}, p, m, chunks * p)
    try:
        plan = validate(cfg)
    except ScheduleError:
        assert not valid, "a valid linearization was refused"
        return
    run_and_compare(cfg, plan)


def test_aqsgd_unsized_messages_run_through_the_executor_with_both_caches_in_step(base_cfg, tmp_path):
    """AQ-SGD's payload length follows its cache (no payload_nbytes): header-first messages. A corpus of
    exactly one batch (3 samples of 4 bytes) makes every step after the first send deltas of rows seen."""
    torch.set_num_threads(1)
    text = tmp_path / "three_samples.txt"
    text.write_bytes(bytes(range(65, 65 + 28)))  # 14 bytes train -> 3 windows of 4 (+1); 14 validation
    cfg = configure(base_cfg, {"name": "1f1b"}, 3, 3, 3, steps=3)
    cfg.compress.fwd, cfg.data.path, cfg.data.val_fraction = {"name": "aqsgd"}, str(text), 0.5
    try:
        plan = validate(cfg)
        outcomes = run_inproc(cfg, plan)
    finally:
        cfg.compress.fwd, cfg.data.path, cfg.data.val_fraction = {"name": "none"}, None, 0.1
    fwd_bytes = [sum(s.wire_bytes for k, s in res.codecs.items() if k.endswith(".fwd")) for res in outcomes[0].results]
    assert fwd_bytes[0] > fwd_bytes[1] == fwd_bytes[2] > 0  # later steps send deltas of rows seen before


@pytest.mark.parametrize("name", ["1f1b", "zb_h1", "interleaved_1f1b"])
def test_two_way_contention_times_the_executor_as_the_player(name, base_cfg):
    """net.duplex_efficiency < 1: each receiver stretches what crossed while it sent back; executor and player
    charge it in the same order, so they still agree to the last bit."""
    torch.set_num_threads(1)
    cfg = configure(base_cfg.copy(), {"name": name, **PARAMS.get(name, {})}, 3, 6 if name != "interleaved_1f1b" else 3,
                    6, steps=2)
    cfg.net.duplex_efficiency = 0.7
    cfg.net.uplink_mbps = cfg.net.downlink_mbps = 0.02  # 20 kbit/s: each ~0.1 KB message takes tens of ms
    plan = validate(cfg)
    run_and_compare(cfg, plan)
    stretched = predicted(cfg, plan, 2)
    cfg.net.duplex_efficiency = 1.0
    plain = predicted(cfg, validate(cfg), 2)
    assert max(e for _, e in stretched.values()) > max(e for _, e in plain.values())


@pytest.mark.parametrize("name", ["1f1b", "interleaved_1f1b", "zbv"])
def test_receives_posted_a_step_ahead_give_the_steps_of_receives_posted_at_their_start(base_cfg, name):
    cfg = configure(base_cfg, {"name": name, "virtual_stages": 1 if name == "1f1b" else 2}, 2, 4, 4, steps=3)
    plan = validate(cfg)
    at_start, ahead = run_inproc(cfg, plan), run_inproc(cfg, plan, ahead=1)
    assert executed(ahead, plan) == executed(at_start, plan)
    for a, b in zip(at_start, ahead):
        assert a.grads.keys() == b.grads.keys() and all(torch.equal(a.grads[k], b.grads[k]) for k in a.grads)


def test_a_run_other_than_the_one_whose_receives_were_posted_ahead_fails_naming_both(base_cfg):
    cfg = configure(base_cfg, {"name": "1f1b"}, 2, 4, 4, steps=3)
    with pytest.raises(RuntimeError, match="posted ahead for step 2 of '1f1b', but step 1 of '1f1b' runs"):
        run_inproc(cfg, validate(cfg), ahead=2)

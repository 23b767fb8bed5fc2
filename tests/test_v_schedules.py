"""V-shaped schedules (zbv, dualpipev): torch's orders, the published bubbles, memory and traffic.

Published figures checked here, in units of one chunk (a stage of the 2p-stage model) with the
settings the authors give:
- ZB-V (Qi et al. 2024, arXiv 2401.10241; the authors' comparison table, T_F = T_B = T_W): no bubble
  in the steady state, 1F1B's activation memory, twice its pipeline traffic. With synchronous steps
  what is left is the V's fill, (p - 1) T_F per rank, whatever the number of microbatches (the
  authors overlap it with the previous step through optimizer post-validation, which lowbw's
  synchronous steps do not do).
- DualPipeV (DeepSeek-V3 report, arXiv 2412.19437, Table 2; the DualPipe repository's table for the
  V variant): bubble (PP/2 - 1)(F&B + B - 3W) for PP = 2p chunks, F&B the time of an overlapped
  forward-backward pair (here F + B: one core runs them in turn), B a full backward, W its weight
  half; PP + 1 chunk activations per device.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lowbw.errors import ConfigError
from lowbw.pipeline.actions import Kind, Schedule
from lowbw.pipeline.schedules import build_schedule
from lowbw.pipeline.player import play
from lowbw.testing import torch_private
from lowbw.testing.activations_held import in_flight

TORCH_PRIVATE_MISSING = torch_private.unavailable("csv", "fake_process_group")


def make(name: str, p: int, m: int) -> Schedule:
    return build_schedule(SimpleNamespace(name=name, csv=None), p, m)


def idle_per_rank(sched: Schedule, f: float, i: float, w: float) -> list[float]:
    times = {Kind.FORWARD: f, Kind.BACKWARD_INPUT: i, Kind.BACKWARD_WEIGHT: w, Kind.FULL_BACKWARD: i + w}
    tl = play(sched, lambda r, a: times[a.kind])
    span = max(e.end for e in tl.events)
    return [span - tl.busy(r) for r in range(sched.n_ranks)]


def messages(sched: Schedule) -> int:
    return sum(a.kind in (Kind.SEND_F, Kind.SEND_B) for acts in sched.actions.values() for a in acts)


@pytest.mark.skipif(TORCH_PRIVATE_MISSING is not None, reason=TORCH_PRIVATE_MISSING or "")
@pytest.mark.parametrize("name, cls", [("zbv", "ScheduleZBVZeroBubble"), ("dualpipev", "ScheduleDualPipeV")])
@pytest.mark.parametrize("p", [2, 3, 4])
def test_v_generators_give_torchs_orders_and_refuse_what_torch_refuses(name, cls, p, tmp_path):
    for m in range(1, 13):
        path = tmp_path / f"{m}.csv"
        try:
            torch_private.dump_torch_schedule(cls, p, m, [0, 2 * p - 1], 2 * p, str(path), "compute_only")
        except ValueError:  # torch refuses the shape (DualPipeV: fewer microbatches than stages)
            with pytest.raises(ConfigError, match="pipeline.microbatches"):
                make(name, p, m)
            continue
        theirs, mine = Schedule.from_csv(path), make(name, p, m)
        assert theirs.actions == mine.actions and theirs.stage_to_rank == mine.stage_to_rank, m
        assert theirs.overlaps == mine.overlaps, m


@pytest.mark.parametrize("p", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_zbv_idle_per_rank_is_only_the_fill_of_the_v_whatever_the_microbatches(p, k):
    m = 2 * p * k
    assert idle_per_rank(make("zbv", p, m), 1.0, 1.0, 1.0) == pytest.approx([p - 1.0] * p, abs=1e-9)
    # a sixth of 1F1B's idle time per rank for the same model on the same ranks (1F1B's stage = 2 chunks)
    f1b = idle_per_rank(make("1f1b", p, m), 2.0, 2.0, 2.0)
    assert f1b == pytest.approx([6.0 * (p - 1)] * p, abs=1e-9)


@pytest.mark.parametrize("p", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("extra", [0, 1, 5])
@pytest.mark.parametrize("f, i, w", [(1.0, 1.0, 1.0), (1.0, 1.0, 0.5)])
def test_dualpipev_bubble_is_deepseeks_formula(p, extra, f, i, w):
    m = 2 * p + extra
    pp, b = 2 * p, i + w
    f_and_b = f + b  # the overlapped pair, run in turn on one core
    want = (pp / 2 - 1) * (f_and_b + b - 3 * w)
    assert idle_per_rank(make("dualpipev", p, m), f, i, w) == pytest.approx([want] * p, abs=1e-9)


@pytest.mark.parametrize("p", [2, 3, 4, 6, 8])
def test_v_schedules_hold_1f1b_memory_or_one_more_and_send_twice_its_messages(p):
    m = 4 * p
    zbv, dpv, f1b = make("zbv", p, m), make("dualpipev", p, m), make("1f1b", p, m)
    worst_1f1b = 2 * max(in_flight(f1b, r) for r in range(p))  # in chunks: a 1F1B stage is two of them
    assert [in_flight(zbv, r) for r in range(p)] == [worst_1f1b] * p  # ZB-V: 1F1B's, on every rank
    assert [in_flight(dpv, r) for r in range(p)] == [2 * p + 1] * p  # DualPipeV: PP + 1
    assert messages(zbv) == messages(dpv) == 2 * messages(f1b)


def test_dualpipev_pairs_wait_for_both_inputs_and_send_after_both_parts():
    sched = make("dualpipev", 2, 4)
    acts = [str(a) for a in sched.actions[0]]
    # torch's (0F3;3B1)OVERLAP_F_B: both receives first, then the pair, then both sends
    k = acts.index("0F3")
    assert acts[k + 1] == "3B1" and acts[k + 2:k + 4] == ["0SEND_F3", "3SEND_B1"]
    j = acts.index("0B0")
    assert acts[j - 3:j] == ["3RECV_F2", "0RECV_B0", "3F2"]
    assert (0, sched.actions[0][k], sched.actions[0][k + 1]) in sched.overlaps


def test_overlap_f_b_cells_read_and_write_back_as_torch_writes_them(tmp_path):
    sched = make("dualpipev", 2, 4)
    path = tmp_path / "d.csv"
    sched.to_csv(path, compute_only=True)
    row0 = path.read_text().splitlines()[0].split(",")
    assert "(0F3;3B1)OVERLAP_F_B" in row0 and "(3F2;0B0)OVERLAP_F_B" in row0
    back = Schedule.from_csv(path)
    assert back.actions == sched.actions and back.overlaps == sched.overlaps


def test_an_overlap_cell_that_is_not_a_forward_and_a_backward_is_refused_naming_it(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("0F0,(0B0;0F1)OVERLAP_F_B\n1F0,1B0\n")
    with pytest.raises(ValueError, match=r"rank 0: cannot read action '\(0B0;0F1\)OVERLAP_F_B'"):
        Schedule.from_csv(path)


def test_v_schedules_need_two_layers_a_rank(compose):
    from lowbw.validation import validate

    with pytest.raises(ConfigError, match="8 chunks \\(2 per rank, pipeline.stages=4\\) but model.n_layer=6"):
        validate(compose(["schedule=zbv", "pipeline.stages=4", "model.n_layer=6"]))
    with pytest.raises(ConfigError, match="pipeline.microbatches >= 2 x pipeline.stages"):
        validate(compose(["schedule=dualpipev", "pipeline.stages=4", "pipeline.microbatches=4",
                          "model.n_layer=8"]))

"""PipeDream-2BW: never flushes, weight stashing, gradients one version late (staleness measured)."""

import pytest
import torch

from lowbw.errors import ConfigError
from lowbw.testing.gradcheck import Scenario
from lowbw.pipeline.schedules import add_communication, build_schedule, one_f_one_b
from lowbw.pipeline.player import validate_schedule


def make(p, m):
    from types import SimpleNamespace

    return build_schedule(SimpleNamespace(name="pipedream_2bw", csv=None), p, m)


def test_steps_chain_into_one_1f1b_without_flushes_for_2_to_8_stages():
    for p in range(2, 9):
        for m in range(p, 17):
            sched = make(p, m)
            for steps in (1, 2, 3):
                run = sched.unrolled(steps)  # what the ranks execute step after step
                validate_schedule(run)  # no deadlock, every send (also across step boundaries) received
                rows, _ = one_f_one_b(p, steps * m)
                assert run.actions == add_communication(rows, sched.stage_to_rank)  # one fill, one drain


def test_needs_at_least_as_many_microbatches_as_stages():
    with pytest.raises(ConfigError, match="microbatches >= pipeline.stages"):
        make(4, 3)


def test_staleness_is_one_version_and_training_follows_the_2bw_rule():
    """Measured in a 3-rank run of 4 steps: each microbatch's forward and backward use the weight
    version of its batch on every stage (the backward's version is read off the gradient buffers it
    wrote); the update at the end of step t applies version t-1's gradient to version t (delay 1);
    backwards cross step boundaries (no flush); the weights equal one process following
    W(t+1) = W(t) - AdamW(grad f(W(t-1)))."""
    from lowbw.testing.async_check import pipelined_2bw, reference_2bw

    torch.set_num_threads(1)
    sc = Scenario("pipedream_2bw", stages=3, n_layer=3, microbatches=4)
    steps = 4
    ranks = pipelined_2bw(sc, steps)
    want, want_losses = reference_2bw(sc, steps)

    crossing = 0
    for r, out in enumerate(ranks):
        log = out["log"]
        fwd = {(e["stage"], e["batch"], e["mb"]): e["version"] for e in log if e["what"] == "forward"}
        bwd = {(e["stage"], e["batch"], e["mb"]): e for e in log if e["what"] == "backward"}
        assert len(fwd) == len(bwd) == steps * sc.microbatches
        for key, v in fwd.items():
            assert v == key[1]  # batch b runs on version b
            assert bwd[key]["version"] == [v], key  # the backward wrote version v's gradients, and only those
        crossing += sum(1 for e in bwd.values() if e["step"] == e["batch"] + 1)
        updates = [e for e in log if e["what"] == "update"]
        assert [u["step"] for u in updates] == list(range(1, steps))
        for u in updates:
            assert u["base_version"] - u["grad_version"] == 1  # staleness: one version
            assert u["new_version"] == u["base_version"] + 1
        assert out["left"] == 0  # drained at the end
    assert crossing == sum(sc.stages - 1 - r for r in range(sc.stages)) * (steps - 1)  # w_r per step boundary

    got = {k: v for out in ranks for k, v in out["weights"].items()}
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    for a, b in zip(ranks[-1]["losses"], want_losses):
        assert a == pytest.approx(b, rel=1e-5)


def test_pipedream_2bw_trains_through_the_config(compose, tmp_path):
    """schedule=pipedream_2bw runs end to end (virtual clock, emulated links, evaluation, summary)."""
    from lowbw.train import run

    cfg = compose(["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "progress=false",
                   "schedule=pipedream_2bw", "pipeline.stages=2", "pipeline.microbatches=2", "train.steps=3",
                   "train.eval_batches=1"])
    summary = run(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["steps_completed"] == 3

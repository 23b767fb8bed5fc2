"""Whole runs: bubble fractions, determinism, a dying rank, the default command, torchrun."""

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import pytest

from lowbw.launch import RunFailed, free_port
from lowbw.train import run

TINY = ["model.n_layer=4", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "progress=false"]
# A deterministic run: FLOP-based durations on the virtual clock over home broadband.
DETERMINISTIC = TINY + ["clock=virtual", "clock.durations=flops", "train.steps=3", "train.eval_batches=1", "net=home"]

SUMMARY_FIELDS = {
    "status", "clock", "steps_completed", "steps", "tokens", "tokens_per_s", "tokens_per_s_wall", "step_time_s",
    "step_time_wall_s", "bubble_fraction", "bytes_sent", "bytes_per_token", "bytes_per_link", "train_loss",
    "val_loss", "run_dir", "metrics", "tensorboard", "world_size", "schedule", "net",
}


def losses(run_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    from lowbw.train import compose

    d = tmp_path_factory.mktemp("ref")
    return run(compose(DETERMINISTIC), d), d


def _bubble_run(compose, tmp_path, schedule, p, m):
    cfg = compose(TINY + [f"schedule={schedule}", f"pipeline.stages={p}", f"pipeline.microbatches={m}",
                          f"train.batch_size={m}", "clock=virtual", "clock.durations=fixed", "net=ideal",
                          "train.steps=2", "train.eval_batches=1", "train.warmup_steps=0"])
    return run(cfg, tmp_path)


def test_1f1b_bubble_fraction_matches_formula_with_equal_stage_durations(compose, tmp_path):
    p, m = 4, 8
    s = _bubble_run(compose, tmp_path, "1f1b", p, m)
    assert s["bubble_fraction"] == pytest.approx((p - 1) / (m + p - 1), abs=0.02)
    assert s["step_time_s"] == pytest.approx((m + p - 1) * 3.0)  # forward 1 s + backward 2 s per stage


def test_gpipe_bubble_and_idle_energy_per_token_follow_the_bubble_formula(compose, tmp_path):
    p = 4
    runs = {m: _bubble_run(compose, tmp_path / f"m{m}", "gpipe", p, m) for m in (2, 8)}
    for m, s in runs.items():
        assert s["bubble_fraction"] == pytest.approx((p - 1) / (m + p - 1), abs=0.02)
    # idle rank-seconds per step are p * 3 s * (p - 1) whatever m; tokens per step grow with m
    idle = {m: s["energy"]["idle_j"] / s["tokens"] for m, s in runs.items()}
    predicted = {m: (p - 1) / (m + p - 1) * (m + p - 1) * 3.0 / m for m in runs}  # idle s per token-row
    assert idle[2] / idle[8] == pytest.approx(predicted[2] / predicted[8], rel=1e-6)  # = 4
    assert idle[2] > idle[8]


def test_same_seed_gives_identical_losses_and_step_times(compose, tmp_path, reference_run):
    ref, _ = reference_run
    again = run(compose(DETERMINISTIC), tmp_path)
    assert again["train_loss"] == ref["train_loss"] and again["val_loss"] == ref["val_loss"]
    assert losses(tmp_path) == losses(ref["run_dir"])
    assert again["step_time_s"] == ref["step_time_s"]  # FLOP-based durations: timing is deterministic too
    assert set(SUMMARY_FIELDS) <= set(ref)
    assert ref["status"] == "completed" and ref["clock"] == "virtual"


# Every figure of a metrics line that is on the run's clock (or priced from it), and the losses.
CLOCK_FIGURES = ("step_time_s", "tokens_per_s", "bubble_fraction", "busy_s", "idle_s", "bytes_per_link",
                 "elapsed_s", "elapsed_j", "loss", "val_loss")


def test_two_default_runs_give_bit_identical_virtual_clock_figures_and_losses(compose, tmp_path):
    """The default clock charges FLOPs / the stated profile (cpu_local): nothing of the machine's speed or load."""
    short = ["progress=false", "train.steps=3", "train.eval_batches=1"]  # shorter, the clock left at its defaults
    runs = [run(compose(short), tmp_path / str(i)) for i in (0, 1)]
    lines = [[json.loads(x) for x in (tmp_path / str(i) / "metrics.jsonl").read_text().splitlines()] for i in (0, 1)]
    assert runs[0]["timing"]["durations"] == "flops" and runs[0]["timing"]["deterministic"] is True
    assert "deterministic" in runs[0]["timing"]["timing"] and "cpu_local" in runs[0]["timing"]["timing"]
    for a, b in zip(*lines):
        assert {k: a.get(k) for k in CLOCK_FIGURES} == {k: b.get(k) for k in CLOCK_FIGURES}
    for key in ("step_time_s", "tokens_per_s", "bubble_fraction", "train_loss", "val_loss"):
        assert runs[0][key] == runs[1][key], key
    assert runs[0]["energy"]["total_j"] == runs[1]["energy"]["total_j"]
    assert lines[0][0]["step_time_wall_s"] != lines[1][0]["step_time_wall_s"]  # the wall clock is not the run's


def test_gloo_for_every_message_gives_the_same_run_as_shared_memory(compose, tmp_path, reference_run):
    """net.wire only changes what carries the bytes between ranks of this host (auto: shared memory)."""
    ref, _ = reference_run
    again = run(compose(DETERMINISTIC + ["net.wire=gloo"]), tmp_path)
    assert losses(tmp_path) == losses(ref["run_dir"])
    assert (again["step_time_s"], again["val_loss"]) == (ref["step_time_s"], ref["val_loss"])


def test_measured_durations_are_labelled_machine_dependent(compose):
    from lowbw.timing import describe
    from lowbw.validation import validate

    cfg = compose(["clock.durations=measured"])
    t = describe(cfg, validate(cfg).profiles)
    assert t["deterministic"] is False and "machine-dependent" in t["timing"]
    wall = compose(["clock=wall"])
    assert "machine-dependent" in describe(wall, validate(wall).profiles)["timing"]


def test_a_dying_rank_ends_the_run_quickly_with_an_error_naming_it(compose, tmp_path):
    cfg = compose(TINY + ["clock=virtual", "net=ideal", "train.steps=20", "faults.crash_rank=2",
                          "faults.crash_step=1", "timeout_s=60"])
    t0 = time.monotonic()
    with pytest.raises(RunFailed) as info:
        run(cfg, tmp_path)
    assert time.monotonic() - t0 < 60
    assert info.value.rank == 2 and "rank 2" in str(info.value)
    assert mp.active_children() == []  # nobody left behind
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_rank"] == 2
    assert len(losses(tmp_path)) == 1  # step 0 completed and was kept


def test_default_command_completes_and_writes_every_summary_field(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lowbw.train", "train.steps=3", "train.eval_batches=1", f"out_dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(SUMMARY_FIELDS) <= set(summary) and summary["status"] == "completed"
    assert summary["net"] == "home" and summary["world_size"] == 4
    assert "tokens/s" in out.stdout and "bubble fraction" in out.stdout
    # no GPU and no RAPL here: energy is there, and says it is modelled
    assert summary["energy"]["label"] == "modelled" and summary["energy"]["measured_j"] is None
    assert summary["energy"]["j_per_token"] > 0 and "J/token (modelled)" in out.stdout
    for name in ("config.yaml", "provenance.json", "metrics.jsonl", "timeline.jsonl"):
        assert (tmp_path / "run" / name).is_file()
    assert any((tmp_path / "run" / "tb").iterdir())


def _torchrun(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args, "-m", "lowbw.train", *DETERMINISTIC],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_torchrun_single_node_gives_the_same_losses_as_self_spawned(tmp_path, reference_run):
    ref, _ = reference_run
    scratch = tmp_path / "tmp"  # this run's own temporary folder: other tests' runs leave theirs elsewhere
    scratch.mkdir()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-addr",
                        "127.0.0.1", "--master-port", str(free_port()), "-m", "lowbw.train", *DETERMINISTIC,
                        f"out_dir={tmp_path}/run"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TMPDIR": str(scratch)})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert losses(tmp_path / "run") == losses(ref["run_dir"])
    assert not list(scratch.glob("lowbw-rank*"))  # ranks 1-3 removed their scratch run folders


def test_torchrun_two_nodes_on_loopback_give_the_same_losses(tmp_path, reference_run):
    ref, _ = reference_run
    port = str(free_port())
    common = ["--nnodes", "2", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", port]
    nodes = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *common, "--node-rank", str(n), "-m",
                          "lowbw.train", *DETERMINISTIC, f"out_dir={tmp_path}/run"],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for n in (0, 1)
    ]
    try:
        outs = [n.communicate(timeout=300)[0] for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert losses(tmp_path / "run") == losses(ref["run_dir"])

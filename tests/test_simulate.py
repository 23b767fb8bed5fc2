"""lowbw-simulate: FLOPs, the fast player, agreement with real runs, scale, the command line."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lowbw.config import ModelConfig
from lowbw.net.link import LinkModel
from lowbw.net.topology import PairLink, Topology
from lowbw.pipeline.fastplay import Program, play_fast
from lowbw.pipeline.schedules import build_schedule
from lowbw.pipeline.validate import play
from lowbw.models.flops import flop_formula, flop_parts, stage_flops
from lowbw.simulate import compose, simulate


def test_flop_formula_equals_torch_flop_counter_on_real_stages():
    """lowbw-train counts a stage's FLOPs with flop_counter on a meta copy of the real stage (on CPU
    tensors the fused attention kernel would count 0); the simulator's formula must match it exactly."""
    from lowbw.models.gpt import GPTStage
    from lowbw.models.flops import count_stage_flops

    cfg = ModelConfig(n_layer=3, n_embd=32, n_head=4, block_size=16)
    mb, T, d = 2, 16, 32
    per_stage, _ = stage_flops(cfg, 2, mb, [2, 1])
    for s, (a, b) in enumerate([(0, 2), (2, 3)]):
        stage = GPTStage(cfg, a, b, s == 0, s == 1, seed=0)
        x = torch.zeros(mb, T, dtype=torch.long) if s == 0 else torch.randn(mb, T, d)
        y = torch.zeros(mb, T, dtype=torch.long) if s == 1 else None
        f, bwd = count_stage_flops(stage, x, y)
        assert f == pytest.approx(per_stage[s][0], rel=1e-12)
        assert bwd == pytest.approx(per_stage[s][1], rel=1e-12)


def test_flop_formula_equals_flop_counter_on_meta_modules_of_a_small_shape():
    cfg = ModelConfig(n_layer=2, n_embd=64, n_head=4, block_size=32)
    assert flop_parts(cfg, 3) == flop_formula(cfg, 3)  # meta SDPA decomposes to bmm: attention counted (as full)


def test_flop_formula_equals_flop_counter_on_meta_modules_of_the_1b_shape():
    cfg = compose([]).model
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.block_size) == (24, 2048, 16, 2048)
    assert flop_parts(cfg, 1) == flop_formula(cfg, 1)


VARIANTS = [("gpipe", {}), ("1f1b", {}), ("zb_h1", {}), ("interleaved_1f1b", {"virtual_stages": 2})]


@pytest.mark.parametrize("name,params", VARIANTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_player_gives_exactly_what_play_gives(name, params, seed):
    rng = random.Random(seed)
    p, m = 4, 8
    sched = build_schedule(SimpleNamespace(name=name, csv=None, **params), p, m)
    pairs = {(i, j): PairLink(rng.uniform(0, 0.05), 0.01 * seed, rng.uniform(1e6, 1e8))
             for i in range(p) for j in range(p) if i != j}
    topo = Topology(p, "pipelined", (5e7,) * p, (5e7,) * p, pairs)
    dur = {}

    def duration(r, a):
        return dur.setdefault((r, str(a)), rng.uniform(0.01, 0.2))

    def size(a):
        return 10_000 + 100 * a.microbatch

    links_a = {r: LinkModel(topo, r, seed=3) for r in range(p)}
    links_b = {r: LinkModel(topo, r, seed=3) for r in range(p)}
    prog = Program(sched)
    start_a = start_b = {r: 0.0 for r in range(p)}
    for step in range(3):  # link queues carry over from step to step
        tl = play(sched, duration, size, links_a, start_a, step)
        res = play_fast(prog, duration, size, links_b, start_b, step, record=True)
        ends = {r: max(e.end for e in tl.events if e.rank == r) for r in range(p)}
        assert [ends[r] for r in range(p)] == pytest.approx(res.end, abs=0, rel=1e-15)
        assert sorted(tl.events, key=lambda e: (e.rank, e.start, e.label)) == \
            sorted(res.events, key=lambda e: (e.rank, e.start, e.label))
        start_a, start_b = ends, {r: res.end[r] for r in range(p)}


def _run_and_simulate(tmp_path: Path, extra: list[str], clock: list[str]) -> tuple[dict, dict]:
    from lowbw.train import compose as train_compose
    from lowbw.train import run

    base = ["pipeline.stages=2", "pipeline.microbatches=4", "train.batch_size=8", "model.n_layer=4", "net=home"] + extra
    summary = run(train_compose(base + clock + ["clock=virtual", "train.steps=4", "progress=false", "train.eval_batches=1"]),
                  tmp_path / "run")
    sim = simulate(compose(base + ["model=tiny", "sim.activation_dtype=float32", "sim.durations=timeline",
                                   f"sim.timeline={tmp_path / 'run' / 'timeline.jsonl'}", "sim.steps=4",
                                   "sim.picture_steps=0"]))
    return summary, sim


@pytest.mark.parametrize("extra,clock", [
    (["schedule=1f1b"], ["clock.durations=flops"]),
    (["schedule=interleaved_1f1b", "schedule.virtual_stages=2"], ["clock.durations=measured"]),
])
def test_simulator_reproduces_a_virtual_clock_run_fed_its_durations(tmp_path, extra, clock):
    run, sim = _run_and_simulate(tmp_path, extra, clock)
    assert run["status"] == "completed"
    assert sim["step_time_s"] == pytest.approx(run["step_time_s"], rel=0.02)
    assert sim["bubble_fraction"] == pytest.approx(run["bubble_fraction"], abs=0.02)
    assert sim["bytes_per_token"] == pytest.approx(run["bytes_per_token"], rel=0.01)


def test_64_stages_256_microbatches_10_steps_runs_and_agrees_with_the_formulas():
    for name, v in (("1f1b", 1), ("zb_h1", 1)):
        cfg = compose(["pipeline.stages=64", "pipeline.microbatches=256", "sim.steps=10", "sim.picture_steps=0",
                       f"schedule={name}", "net=ideal", "sim.durations=fixed", "sim.forward_s=1.0",
                       "sim.backward_s=2.0"])
        s = simulate(cfg)
        assert s["n_stages"] == 64 and s["steps"] == 10
        assert s["bubble_fraction"] == pytest.approx(s["bubble_formula"], abs=0.02), name
        # a step on ideal links: the longest rank's work plus the bubble
        assert s["step_time_s"] == pytest.approx(3 * 256 / (1 - s["bubble_formula"]), rel=0.02)


def test_slow_links_dominate_the_1b_model_across_continents():
    s = simulate(compose(["pipeline.stages=8", "pipeline.microbatches=16", "sim.steps=3", "sim.picture_steps=0"]))
    assert s["fractional_partition"] is False
    assert s["message_bytes"]["fwd"] == 1 * 2048 * 2048 * 2  # one sequence of bf16 activations
    assert s["bubble_fraction"] > 0.5  # 8 MB per microbatch over < 1 Gbit/s: the links, not the H100s, decide
    int8 = simulate(compose(["pipeline.stages=8", "pipeline.microbatches=16", "sim.steps=3", "sim.picture_steps=0",
                             "compress/fwd=int8", "compress/bwd=int8"]))
    assert int8["bytes_per_token"] < s["bytes_per_token"] / 1.5
    assert int8["step_time_s"] < s["step_time_s"]


def test_lowbw_simulate_command_writes_summary_and_pictures(tmp_path):
    out = tmp_path / "sim"
    proc = subprocess.run([sys.executable, "-m", "lowbw.simulate", f"out_dir={out}", "pipeline.stages=4",
                           "pipeline.microbatches=8", "schedule=zb_h1", "net=transatlantic", "hardware=a100"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    s = json.loads((out / "summary.json").read_text())
    for key in ("step_time_s", "tokens_per_s", "bubble_fraction", "bytes_per_token", "bytes_per_link_per_step"):
        assert s[key] is not None
    assert "step time" in proc.stdout
    assert (out / "timeline.png").stat().st_size > 0
    assert json.loads((out / "trace.json").read_text())["traceEvents"]


def test_simulate_config_errors_name_the_setting():
    from lowbw.errors import ConfigError

    with pytest.raises(ConfigError, match="train.batch_size"):
        simulate(compose(["train.batch_size=7", "pipeline.microbatches=4", "pipeline.stages=2"]))
    with pytest.raises(ConfigError, match="sim.timeline"):
        simulate(compose(["pipeline.stages=2", "pipeline.microbatches=2", "sim.durations=timeline"]))

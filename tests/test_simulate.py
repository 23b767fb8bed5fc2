"""lowbw-simulate: FLOPs, steady-state extrapolation, agreement with real runs, scale, the command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbw.config import ModelConfig
from lowbw.models.flops import flop_formula, flop_parts, stage_flops
from lowbw.simulate import compose, format_simulation, simulate


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


BASE = ["pipeline.stages=8", "pipeline.microbatches=16", "sim.steps=8", "sim.picture_steps=0"]


def _differences(a, b, where: str = "") -> list[str]:
    """Where two summaries differ by more than 1e-9 relative (CPU time and the step counts left out)."""
    if isinstance(a, dict):
        return [d for k in a if k not in ("sim_cpu_s", "steps_played", "steps_extrapolated")
                for d in _differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list):
        assert len(a) == len(b), where
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and math.isfinite(a):
        return [] if math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-300) else [f"{where}: {a!r} != {b!r}"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


@pytest.mark.parametrize("over", [
    ["schedule=1f1b", "net=global"],
    ["schedule=zb_h1", "net=home", "compress/fwd=int8", "compress/bwd=int8"],
    ["schedule=interleaved_1f1b", "schedule.virtual_stages=2", "net=random", "hardware=a100"],
    ["schedule=gpipe", "net=transatlantic", "net.semantics=serialized", "sim.durations=fixed"],
    ["schedule=1f1b", "net=home", "net.loss_rate=0.001"],
    ["schedule=1f1b", "net=home", "net.emulate=false", "sim.warmup_steps=0"],
])
def test_extrapolated_steps_give_what_playing_every_step_gives(over):
    fast = simulate(compose(BASE + over))
    full = simulate(compose(BASE + over + ["sim.extrapolate=false"]))
    assert full["steps_played"] == 8 and full["steps_extrapolated"] == 0
    assert fast["steps_played"] < 8 and fast["steps_played"] + fast["steps_extrapolated"] == 8
    assert _differences(fast, full) == []
    # every played step after the repeat is the repeated step, to rounding (the bound _repeats proves)
    k = fast["steps_played"] - 1
    for row in full["per_step"][k:]:
        assert row["step_time_s"] == pytest.approx(full["per_step"][k]["step_time_s"], rel=1e-12)


def test_steps_that_vary_are_all_played():
    jitter = simulate(compose(BASE + ["schedule=1f1b", "net=home", "net.jitter_ms=2"]))
    assert (jitter["steps_played"], jitter["steps_extrapolated"]) == (8, 0)
    assert len({round(r["step_time_s"], 12) for r in jitter["per_step"][1:]}) > 1  # jitter moves every step


def test_summary_and_printout_say_how_many_steps_were_extrapolated():
    s = simulate(compose(BASE + ["schedule=1f1b", "net=global"]))
    text = format_simulation(s)
    assert f"{s['steps_played']} played, {s['steps_extrapolated']} extrapolated" in text
    assert s["steps_extrapolated"] > 0


def test_packet_loss_slows_the_simulated_links():
    clean = simulate(compose(BASE + ["schedule=1f1b", "net=home"]))
    lossy = simulate(compose(BASE + ["schedule=1f1b", "net=home", "net.loss_rate=0.01"]))
    # Mathis ceiling at 1% loss, 50 ms RTT, 1460 B: 8*1460/0.05*1.22/0.1 = 2.9 Mbit/s < 20 Mbit/s uplink
    assert lossy["step_time_s"] > 2 * clean["step_time_s"]


def test_two_way_contention_slows_1f1b_and_is_played_step_by_step():
    plain = simulate(compose(BASE + ["schedule=1f1b", "net=home", "net.uplink_mbps=20", "net.downlink_mbps=20"]))
    duplex = simulate(compose(BASE + ["schedule=1f1b", "net=home", "net.uplink_mbps=20", "net.downlink_mbps=20",
                                      "net.duplex_efficiency=0.8"]))
    assert duplex["step_time_s"] > plain["step_time_s"]
    assert duplex["steps_extrapolated"] == 0  # the receivers' memory of their own sends carries across steps


def test_kernel_links_are_refused_by_the_simulator():
    from lowbw.errors import ConfigError

    with pytest.raises(ConfigError, match="kernel-shaped links are for lowbw-train"):
        simulate(compose(BASE + ["net.backend=kernel"]))


def test_asynchronous_schedule_is_refused_by_name():
    from lowbw.errors import ConfigError

    with pytest.raises(ConfigError, match="schedule=pipedream_2bw"):
        simulate(compose(BASE + ["schedule=pipedream_2bw"]))


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
    assert sim["steps_played"] == 4  # the run's own durations differ from step to step: nothing extrapolated


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


def test_the_simulator_caps_links_at_the_packet_loss_ceiling_as_a_run_does():
    from lowbw.net.conditions import MATHIS_C

    base = ["pipeline.stages=2", "pipeline.microbatches=2", "sim.steps=2", "sim.picture_steps=0", "net=home",
            "net.latency_ms=50", "net.uplink_mbps=1000", "net.downlink_mbps=1000", "sim.durations=fixed",
            "sim.forward_s=0.001", "sim.backward_s=0.002"]
    clean, lossy = simulate(compose(base)), simulate(compose(base + ["net.loss_rate=0.01"]))
    ceiling = 8 * 1460 / 0.1 * MATHIS_C / 0.1  # bit/s at 1% loss, RTT 100 ms: about 1.4 Mbit/s
    fwd_bytes = lossy["message_bytes"]["fwd"]
    # each step moves one activation and one gradient message per microbatch over the same pair
    assert lossy["step_time_s"] > clean["step_time_s"] + 2 * 8 * fwd_bytes / ceiling

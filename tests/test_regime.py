"""A deployment's regime on a laptop: a tiny GPT learns while the clock keeps a 1B GPT's timing, which must be
lowbw-simulate's for that target."""

import pytest
import torch

from lowbw.compress import build_codec
from lowbw.errors import ConfigError
from lowbw.regime import build_regime
from lowbw.simulate import compose as sim_compose
from lowbw.simulate import simulate
from lowbw.train import run
from lowbw.validation import validate

# The target: gpt_1b on RTX 4090s over home broadband; the learner: a tiny GPT with as many blocks as stages.
SHARED = ["net=home", "hardware=rtx4090"]
LEARNER = ["model.n_layer=4", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "progress=false",
           "train.eval_batches=1", "regime=gpt_1b"]

CASES = {
    "1f1b_none": ["schedule=1f1b", "pipeline.stages=4", "pipeline.microbatches=8", "train.batch_size=8"],
    "zb_h1_int8": ["schedule=zb_h1", "pipeline.stages=3", "pipeline.microbatches=6", "train.batch_size=12",
                   "compress/fwd=int8", "compress/bwd=int8"],
}


def _target_simulation(case: list[str], steps: int) -> dict:
    return simulate(sim_compose(SHARED + case + ["model=gpt_1b", f"sim.steps={steps}", "sim.picture_steps=0",
                                                 "sim.activation_dtype=bfloat16"]))


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_regime_runs_step_time_equals_the_simulators_for_the_target(name, compose, tmp_path):
    case = CASES[name]
    model_layers = ["model.n_layer=3"] if "pipeline.stages=3" in case else []
    s = run(compose(LEARNER + SHARED + case + model_layers + ["train.steps=4"]), tmp_path)
    sim = _target_simulation(case, 4)
    assert s["status"] == "completed"
    assert s["step_time_s"] == pytest.approx(sim["step_time_s"], rel=0.01)
    assert s["bubble_fraction"] == pytest.approx(sim["bubble_fraction"], abs=0.01)
    assert s["bytes_per_token"] == pytest.approx(sim["bytes_per_token"], rel=0.01)  # the target's bytes and tokens
    assert s["energy"]["j_per_token"] == pytest.approx(sim["energy"]["j_per_token"], rel=0.01)
    assert s["tokens"] == 4 * sim["tokens_per_step"]
    # and it says so: the timing is projected for the target, the learning is the tiny GPT's
    assert s["timing"]["timing"].startswith(f"projected: gpt_1b on {case[1].split('=')[1]}x rtx4090 over home")
    assert "tiny GPT" in s["timing"]["learning"] and "measured" in s["timing"]["learning"]
    assert s["regime"]["tokens_per_step"] == sim["tokens_per_step"]


def test_the_regime_charges_each_message_what_the_same_codec_sends_for_the_target(compose):
    case = CASES["zb_h1_int8"]
    regime = build_regime(compose(LEARNER + SHARED + case + ["model.n_layer=3"]), 3)
    sim = _target_simulation(case, 1)
    assert {d: regime.message_bytes[d][0] for d in ("fwd", "bwd")} == sim["message_bytes"]
    # the run's message: what int8 puts on the wire for a float32 activation of the learner (2 x 16 x 32)
    assert regime.message_bytes["fwd"][1] == build_codec({"name": "int8"}).encode(torch.randn(2, 16, 32)).numel()
    # int8 shrinks float32 about 3.7x but bf16 about 1.9x: the codec's bytes per element carry over, not its ratio
    run_ratio = 2 * 16 * 32 * 4 / regime.message_bytes["fwd"][1]
    target_ratio = 2 * 2048 * 2048 * 2 / regime.message_bytes["fwd"][0]
    assert run_ratio > 3.5 and target_ratio < 2.0


def test_without_a_regime_the_clock_times_the_runs_own_model(compose):
    assert validate(compose([])).regime is None


@pytest.mark.parametrize("overrides,setting", [
    (["clock=wall"], "clock=virtual"),
    (["clock.durations=measured"], "clock.durations=flops"),
    (["regime.name=none"], "regime.name"),
    (["regime.model.n_head=3"], "regime.model.n_head"),
    (["regime.activation_dtype=int8"], "regime.activation_dtype"),
])
def test_a_regime_the_clock_cannot_keep_is_refused_naming_the_setting(compose, overrides, setting):
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
        validate(compose(["regime=gpt_1b"] + overrides))

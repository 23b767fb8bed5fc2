"""Golden numbers of lowbw-simulate: summaries of a set of simulations, pinned to what the code produced.

A change meant to keep the simulator's behaviour (a faster player, steady-state extrapolation, a refactor)
must reproduce every number here to 1e-9 relative: step times, bubbles, bytes per link, link busy
fractions, energy, per-step rows, and the events of the pictured steps. The cases cover every generated
schedule, nets with one preset per kind (uniform, regions with measured pairs, seeded random pairs, jitter,
serialized links, no emulation), codecs in both directions, FLOP / fixed / recorded-timeline durations,
heterogeneous hardware and both network energy models.

Keys a newer simulator adds to its summary are not compared; keys recorded here must stay. A change that is
*meant* to move a number regenerates the file and says why in its commit:

    LOWBW_REGEN_GOLDEN=1 python -m pytest tests/test_simulate_golden.py
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from lowbw.simulate import compose, simulate

GOLDEN = Path(__file__).parent / "golden" / "simulations.json"
REGEN = bool(os.environ.get("LOWBW_REGEN_GOLDEN"))
REL = 1e-9

SMALL = ["pipeline.stages=4", "pipeline.microbatches=8", "sim.steps=5", "sim.picture_steps=0"]

CASES = {
    "gpipe_home_fixed": SMALL + ["schedule=gpipe", "net=home", "sim.durations=fixed"],
    "1f1b_global_h100": ["pipeline.stages=16", "pipeline.microbatches=32", "sim.steps=6", "sim.picture_steps=0",
                         "schedule=1f1b", "net=global"],
    "1f1b_global_32x64_10_steps": ["pipeline.stages=32", "pipeline.microbatches=64", "sim.steps=10",
                                   "sim.picture_steps=0", "schedule=1f1b", "net=global"],
    "zb_h1_global_16x32": ["pipeline.stages=16", "pipeline.microbatches=32", "sim.steps=8", "sim.picture_steps=0",
                           "schedule=zb_h1", "net=global", "compress/fwd=int8", "compress/bwd=int8"],
    "interleaved_v2_random_a100": SMALL + ["schedule=interleaved_1f1b", "schedule.virtual_stages=2", "net=random",
                                           "hardware=a100"],
    "interleaved_v3_datacenter_no_warmup": ["pipeline.stages=4", "pipeline.microbatches=8", "sim.steps=3",
                                            "sim.picture_steps=0", "sim.warmup_steps=0", "schedule=interleaved_1f1b",
                                            "schedule.virtual_stages=3", "net=datacenter", "sim.durations=fixed",
                                            "sim.forward_s=0.01", "sim.backward_s=0.02"],
    "zb_h1_home_jitter": SMALL + ["schedule=zb_h1", "net=home", "net.jitter_ms=5", "hardware=rtx4090",
                                  "sim.warmup_steps=2"],
    "1f1b_transatlantic_serialized_int8": ["pipeline.stages=4", "pipeline.microbatches=6", "sim.steps=4",
                                           "sim.picture_steps=0", "schedule=1f1b", "net=transatlantic",
                                           "net.semantics=serialized", "compress/fwd=int8", "compress/bwd=int8"],
    "gpipe_datacenter_fp16_topk": ["pipeline.stages=8", "pipeline.microbatches=8", "sim.steps=4",
                                   "sim.picture_steps=0", "schedule=gpipe", "net=datacenter", "compress/fwd=fp16",
                                   "compress/bwd=topk", "compress.bwd.ratio=0.05"],
    "1f1b_home_not_emulated": SMALL + ["schedule=1f1b", "net=home", "net.emulate=false"],
    "1f1b_home_power_energy_mixed_hardware": SMALL + ["schedule=1f1b", "net=home", "energy=power",
                                                      "hardware.per_rank=[h100,a100,rtx4090,t4]"],
    "1f1b_one_step_only": ["pipeline.stages=4", "pipeline.microbatches=4", "sim.steps=1", "sim.picture_steps=0",
                           "schedule=1f1b", "net=metro"],
    "1f1b_lan_int4_pictured": ["pipeline.stages=4", "pipeline.microbatches=4", "sim.steps=4", "sim.picture_steps=2",
                               "schedule=1f1b", "net=lan", "compress/fwd=int4", "compress/bwd=bf16"],
}
# Every case on the GPT-2 block: the block these numbers were recorded with (a summary holds the model's
# parameter count, which differs between blocks).
CASES = {name: ["model.arch=gpt2"] + over for name, over in CASES.items()}

# The timeline case: durations replayed from a run's timeline.jsonl (written here, deterministic).
TIMELINE_CASE = "1f1b_recorded_timeline"
TIMELINE_BASE = ["model.arch=gpt2", "pipeline.stages=3", "pipeline.microbatches=4", "sim.steps=4",
                 "sim.picture_steps=0", "schedule=1f1b", "net=home", "model=tiny", "sim.activation_dtype=float32"]


def _write_timeline(path: Path) -> None:
    """Steps 0-2 of a 3-stage 1F1B run: per-step, per-action durations and optimizer times (step 3 uses means)."""
    lines = []
    for step in range(3):
        for rank in range(3):
            for mb in range(4):
                for kind, code, base in (("forward", "F", 0.010), ("backward", "B", 0.021)):
                    dur = base * (1 + 0.25 * rank) + 0.0013 * mb + 0.0007 * step
                    lines.append({"rank": rank, "kind": kind, "start": 0.0, "end": dur, "step": step,
                                  "label": f"{rank}{code}{mb}"})
            lines.append({"rank": rank, "kind": "optimizer", "start": 1.0, "end": 1.0 + 0.003 * (rank + 1),
                          "step": step, "label": "optimizer"})
    path.write_text("".join(json.dumps(e) + "\n" for e in lines))


def _numbers(summary: dict) -> dict:
    """Everything the simulator computed: the summary without CPU time and paths, events of pictured steps."""
    out = {k: v for k, v in summary.items() if k not in ("sim_cpu_s", "run_dir", "_timeline")}
    tl = summary.get("_timeline")
    if tl is not None:
        out["_events"] = sorted([e.rank, e.kind, e.start, e.end, e.step, e.label, e.nbytes, e.peer] for e in tl.events)
    return out


def _one_case_a_line(data: dict) -> str:
    """The golden file: one case per line, so that a regenerated file's diff names the cases that moved."""
    lines = [f"{json.dumps(k)}: {json.dumps(data[k], sort_keys=True)}" for k in sorted(data)]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _run(case: str, tmp_path: Path) -> dict:
    if case == TIMELINE_CASE:
        path = tmp_path / "timeline.jsonl"
        _write_timeline(path)
        return _numbers(simulate(compose(TIMELINE_BASE + ["sim.durations=timeline", f"sim.timeline={path}"])))
    over = CASES[case]
    return _numbers(simulate(compose(over), keep_timeline="sim.picture_steps=0" not in over))


def _assert_close(got, want, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict), where
        for k in want:  # keys recorded must stay; keys added since are not compared
            assert k in got, f"{where}.{k} missing"
            _assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert isinstance(got, (int, float)), f"{where}: {got!r}"
        if math.isinf(want) or math.isnan(want):
            assert got == want or (math.isnan(got) and math.isnan(want)), f"{where}: {got} != {want}"
        else:
            assert got == pytest.approx(want, rel=REL, abs=1e-300), f"{where}: {got!r} != {want!r}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.fixture(scope="module")
def golden() -> dict:
    return {} if REGEN else json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("case", sorted(CASES) + [TIMELINE_CASE])
def test_simulations_reproduce_their_golden_numbers(case, golden, tmp_path):
    got = json.loads(json.dumps(_run(case, tmp_path)))  # as JSON would store it: tuples -> lists, keys -> str
    if REGEN:
        data = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        data[case] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(_one_case_a_line(data))
        return
    _assert_close(got, golden[case], case)

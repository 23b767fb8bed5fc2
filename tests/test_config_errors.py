"""Bad input becomes one clear sentence naming the setting, before any process is spawned."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowbw.validation import validate
from lowbw.errors import ConfigError


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["net.uplink_mbps=0"], "net.uplink_mbps=0.0 must be a number in \\[0.001, inf\\]"),
        (["net.downlink_mbps=-3"], "net.downlink_mbps"),
        (["net.latency_ms=-1"], "net.latency_ms=-1.0 must be a number in \\[0, 60,000\\]"),
        (["pipeline.stages=5"], "pipeline.stages=5 is more than model.n_layer=4"),
        (["train.batch_size=6", "pipeline.microbatches=4"], "train.batch_size=6 is not divisible by pipeline.microbatches=4"),
        (["schedule.name=zigzag"], "unknown schedule 'zigzag'"),
        (["pipeline.partition=[1,1,1]"], "pipeline.partition=\\[1, 1, 1\\] must list 4"),
        (["model.n_head=3"], "model.n_head=3 must divide model.n_embd=64"),
        (["clock.durations=guess"], "clock.durations='guess'"),
        (["data.path=/nonexistent/corpus.txt"], "data.path='/nonexistent/corpus.txt' does not exist"),
        (["net.semantics=telepathy"], "net.semantics='telepathy'"),
        (["net.wire=pigeon"], "net.wire='pigeon': use auto"),
        (["compress.bwd.name=aqsgd"], "compress.bwd: codec 'aqsgd' is for fwd only"),
        (["schedule=interleaved_1f1b", "schedule.virtual_stages=2"], "model.n_layer=4"),
        (["faults.straggler_rank=7"], "faults name rank 7 but there are 4 ranks"),
        (["net.loss_rate=1.5"], "net.loss_rate=1.5 must be a number in \\[0, 1\\)"),
    ],
)
def test_bad_config_is_rejected_with_the_setting_named(compose, overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose(overrides))


def test_empty_binary_and_short_data_files_are_rejected(compose, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02" * 1000)
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be " * 15)  # 285 bytes: not enough for a 64-byte validation window
    for path, match in [(empty, "is empty"), (binary, "looks binary"), (short, "has 285 bytes, fewer than the 641 needed")]:
        with pytest.raises(ConfigError, match=match):
            validate(compose([f"data.path={path}"]))


def test_cli_rejects_bad_input_before_spawning_with_exit_code_2(tmp_path):
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "lowbw.train", "net.uplink_mbps=0", f"out_dir={tmp_path}/run"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2
    assert "configuration error: net.uplink_mbps=0.0 must be" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing ran
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("override,match", [("net.latency_ms=[1,", "no viable alternative at input"),
                                            ("train.steps=abc", "Value 'abc' of type 'str' could not be converted")])
def test_cli_malformed_overrides_get_hydras_message_without_a_traceback(tmp_path, override, match):
    out = subprocess.run([sys.executable, "-m", "lowbw.train", override], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode != 0 and match in out.stderr and "Traceback" not in out.stderr


def test_cli_unknown_preset_names_the_group_and_options(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lowbw.train", "net=nowhere"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode != 0
    assert "net/nowhere" in out.stderr and "home" in out.stderr  # Hydra lists the available presets


def test_resume_without_checkpoints_is_a_clear_error(compose, tmp_path):
    from lowbw.train import run

    with pytest.raises(ConfigError, match="resume=true but there is no checkpoint folder"):
        run(compose(["resume=true"]), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


# ---- ranges: every numeric setting, before anything runs ------------------------------------------------

@pytest.mark.parametrize(
    "overrides,match",
    [
        (["train.steps=10000000"], r"train.steps=10000000 must be an integer in \[1, 1,000,000\] \(the recorder keeps"),
        (["timeout_s=0.001"], r"timeout_s=0.001 must be a number in \[1, 86,400\]"),
        (["net.latency_ms=1e9"], r"net.latency_ms=1000000000.0 must be a number in \[0, 60,000\] \(on the wall clock"),
        (["net.uplink_mbps=1e-9"], r"net.uplink_mbps=1e-09 must be a number in \[0.001, inf\]"),
        (["train.lr=inf"], r"train.lr=inf must be a number in \(0, inf\)"),
        (["train.lr=nan"], r"train.lr=nan must be a number"),
        (["train.grad_clip=-1"], r"train.grad_clip=-1.0 must be a number in \[0, inf\)"),
        (["seed=-1"], r"seed=-1 must be an integer in \[0, 4,294,967,295\]"),
        (["faults.straggler_factor=1e9"], r"faults.straggler_factor=1000000000.0 must be a number in \[1, 1,000\]"),
        (["data.val_fraction=1e-12"], r"data.val_fraction=1e-12 with model.block_size=64 needs a corpus of"),
        (["faults.bandwidth_walk.enabled=true", "faults.bandwidth_walk.interval_s=0.001",
          "faults.bandwidth_walk.horizon_s=1e6"], r"horizon_s / interval_s = 1,000,000,000 points"),
        (["model.n_layer=8", "pipeline.stages=8", "pipeline.microbatches=65536", "train.batch_size=65536"],
         r"pipeline.microbatches = 524,288 is more than 262,144"),
        (["model.n_embd=16384", "model.n_head=16", "model.n_layer=64"], r"this run needs about .* GiB of memory"),
        (["clock=wall", "clock.durations=flops"], r"clock.durations='flops' applies to clock=virtual only"),
        (["energy=power", "energy.power.mode=busy"], r"energy.power.mode=busy is not available"),
        (["energy.meter=bogus"], r"energy.meter='bogus': choose one of"),
    ],
)
def test_out_of_range_settings_are_refused_naming_the_setting_and_the_limit(compose, overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose(overrides))


def test_a_tiny_validation_fraction_is_refused_at_once_not_after_hours(compose, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be " * 100)
    t0 = time.process_time()
    with pytest.raises(ConfigError, match=r"has 1900 bytes, fewer than the 6,?4\d+"):
        validate(compose([f"data.path={corpus}", "data.val_fraction=1e-14"]))
    assert time.process_time() - t0 < 5  # the closed form, not a count up to 10^15


def test_the_bundled_corpus_size_is_what_the_checks_assume():
    from lowbw.data.corpus import BUNDLED_BYTES, load_bytes

    assert len(load_bytes(None)) == BUNDLED_BYTES


def test_a_binary_bandwidth_trace_is_a_sentence(compose, tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_bytes(b"time_s,factor\n0,1\n\x00\x01\xff")
    with pytest.raises(ConfigError, match="looks binary"):
        validate(compose([f"faults.bandwidth_trace={trace}"]))


def test_a_fault_after_the_last_step_and_an_outage_longer_than_the_timeout_warn(compose):
    plan = validate(compose(["train.steps=5", "faults.crash_rank=1", "faults.crash_step=7", "clock=wall",
                             "timeout_s=10", "faults.outages=[{link: '0->1', start_s: 2, end_s: 30}]"]))
    assert any("faults.crash_step=7 is not before the last step (4): rank 1 will not crash" in w for w in plan.warnings)
    assert any("lasts 28 s on the wall clock, not less than timeout_s=10" in w for w in plan.warnings)


def test_an_out_dir_that_is_a_file_or_cannot_be_written_is_refused_before_anything_runs(compose, tmp_path):
    from lowbw.train import run

    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        run(compose(["train.steps=1"]), a_file)
    with pytest.raises(ConfigError, match="cannot be written"):
        run(compose(["train.steps=1"]), Path("/proc/lowbw-cannot-write-here/run"))


def test_a_baseline_run_that_is_not_a_completed_run_is_refused(compose, tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"status": "failed", "val_loss": None}))
    with pytest.raises(ConfigError, match="is not a completed run \\(status 'failed'\\)"):
        validate(compose([f"compress.baseline_run={tmp_path}"]))
    (tmp_path / "summary.json").write_text("[1, 2")
    with pytest.raises(ConfigError, match="its summary.json is not JSON"):
        validate(compose([f"compress.baseline_run={tmp_path}"]))


def test_cli_tiny_timeout_is_one_sentence_not_cpp_frames(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lowbw.train", "timeout_s=0.001", f"out_dir={tmp_path}/run"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "configuration error: timeout_s=0.001 must be" in out.stderr
    assert "Traceback" not in out.stderr and "frame" not in out.stderr.lower()


@pytest.mark.parametrize("overrides,match", [
    (["pipeline.stages=100000"], r"pipeline.stages=100000 must be an integer in \[1, 65,536\]"),
    (["pipeline.stages=1024", "pipeline.microbatches=1024"], r"pipeline.microbatches = 1,048,576 is more than"),
    (["pipeline.stages=512", "pipeline.microbatches=512", "sim.steps=100"], r"x sim.steps = 26,214,400 is more than"),
    (["sim.steps=0"], r"sim.steps=0 must be an integer in \[1, 100,000\]"),
    (["net.latency_ms=-5"], r"net.latency_ms=-5.0 must be"),
    (["energy=power", "energy.power.mode=busy"], r"energy.power.mode=busy is not available"),
])
def test_simulator_inputs_are_bounded_before_any_work(overrides, match):
    from lowbw.simulate import compose as sim_compose, simulate

    t0 = time.process_time()
    with pytest.raises(ConfigError, match=match):
        simulate(sim_compose(overrides))
    assert time.process_time() - t0 < 5

"""Bad input becomes one clear sentence naming the setting, before any process is spawned."""

import subprocess
import sys
import time

import pytest

from lowbw.validation import validate
from lowbw.errors import ConfigError


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["net.uplink_mbps=0"], "net.uplink_mbps=0.0 .* bandwidth must be > 0"),
        (["net.downlink_mbps=-3"], "net.downlink_mbps"),
        (["net.latency_ms=-1"], "net.latency_ms=-1.0 .* latency must be"),
        (["pipeline.stages=5"], "pipeline.stages=5 is more than model.n_layer=4"),
        (["train.batch_size=6", "pipeline.microbatches=4"], "train.batch_size=6 is not divisible by pipeline.microbatches=4"),
        (["schedule.name=zigzag"], "unknown schedule 'zigzag'"),
        (["pipeline.partition=[1,1,1]"], "pipeline.partition=\\[1, 1, 1\\] must list 4"),
        (["model.n_head=3"], "model.n_head=3 must divide model.n_embd=64"),
        (["clock.durations=guess"], "clock.durations='guess'"),
        (["data.path=/nonexistent/corpus.txt"], "data.path='/nonexistent/corpus.txt' does not exist"),
        (["net.semantics=telepathy"], "net.semantics='telepathy'"),
        (["compress.bwd.name=aqsgd"], "compress.bwd: codec 'aqsgd' is for fwd only"),
        (["schedule=interleaved_1f1b", "schedule.virtual_stages=2"], "model.n_layer=4"),
        (["faults.straggler_rank=7"], "faults name rank 7 but there are 4 ranks"),
        (["net.loss_rate=1.5"], "net.loss_rate=1.5 must lie in"),
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
    assert "configuration error: net.uplink_mbps=0.0" in out.stderr
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

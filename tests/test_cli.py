"""The command lines as a user meets them: --help that says what the tool does, and no litter."""

import os
import subprocess
import sys

import pytest


def _run(args, cwd, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_train_help_says_what_the_tool_does_with_its_groups_and_examples(tmp_path):
    out = _run(["-m", "lowbw.train", "--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("lowbw-train: train a GPT pipeline-parallel")
    assert "powered by Hydra" not in out.stdout
    for group in ("model", "net", "schedule", "clock", "compress/fwd", "compress/bwd", "boundary", "hardware",
                  "energy"):
        assert f"\n  {group} " in out.stdout, group
    assert "options: datacenter, global, home" in out.stdout  # read from configs/net/
    assert "lowbw-train -m " in out.stdout  # an example sweep
    assert not (tmp_path / "outputs").exists()


def test_simulate_help_lists_only_the_groups_the_simulator_reads(tmp_path):
    out = _run(["-m", "lowbw.simulate", "--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("lowbw-simulate: predict")
    assert "\n  clock " not in out.stdout and "options: virtual, wall" not in out.stdout
    assert "\n  net " in out.stdout and "\n  hardware " in out.stdout


@pytest.mark.parametrize("app", ["lowbw.simulate"])
def test_a_run_given_out_dir_writes_only_there(tmp_path, app):
    work, out_dir = tmp_path / "cwd", tmp_path / "run"
    work.mkdir()
    out = _run(["-m", app, "model=tiny", "pipeline.stages=2", "pipeline.microbatches=2", "sim.steps=2",
                f"out_dir={out_dir}"], work)
    assert out.returncode == 0, out.stderr
    assert list(work.iterdir()) == []  # no outputs/<date>/<time>/.hydra in the working folder
    assert (out_dir / "summary.json").is_file() and (out_dir / ".hydra" / "config.yaml").is_file()

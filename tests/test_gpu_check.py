"""scripts/gpu_check.sh: says so and exits 0 without a GPU; its machinery, run on the CPU, compares and reports."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _check(*args, env=None, timeout=900):
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_without_a_gpu_it_says_so_and_exits_0():
    out = _check(env={"CUDA_VISIBLE_DEVICES": ""})  # hides any GPU: the same path as a machine without one
    assert out.returncode == 0, out.stderr
    assert "no CUDA GPU on this machine" in out.stdout and "nothing to check" in out.stdout
    assert "lowbw.train" not in out.stdout  # nothing was run


def test_on_the_cpu_it_compares_the_losses_and_reports_step_time_and_energy(tmp_path):
    out = _check("--device", "cpu", "--steps", "3", "--keep", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "reference-cpu" / "metrics.jsonl").is_file() and (tmp_path / "checked-cpu").is_dir()
    lines = out.stdout.splitlines()
    assert any(ln.startswith("losses: agree: largest difference 0.00e+00") for ln in lines)  # same seed, same device
    assert any(ln.startswith("step time: cpu ") for ln in lines)
    assert any(ln.startswith("energy: modelled device ") and "J/token" in ln for ln in lines)
    assert lines[-1] == "gpu_check: passed"


def test_losses_that_differ_beyond_the_tolerance_fail_the_check(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from gpu_check import compare_losses
    finally:
        sys.path.pop(0)
    for name, losses in (("a", [3.0, 2.5]), ("b", [3.0, 2.502])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(
            f'{{"step": {i}, "loss": {x}}}\n' for i, x in enumerate(losses)))
    ok, line = compare_losses(tmp_path / "a", tmp_path / "b", tolerance=1e-3)
    assert not ok and "DISAGREE" in line and "2.00e-03" in line
    assert compare_losses(tmp_path / "a", tmp_path / "b", tolerance=3e-3)[0]

"""Launchers that launch: 2-run sweeps through submitit (local and a one-node test Slurm) and a local Ray
instance, each reporting the sweep's progress; the progress arithmetic itself."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TINY = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "pipeline.stages=2",
        "train.steps=2", "train.eval_batches=1", "clock=virtual", "progress=false", "net=lan"]
SUBMITIT = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
RAY = importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is not None


def two_run_sweep(sweep_dir, launcher, extra=(), env=None):
    return subprocess.run([sys.executable, "-m", "lowbw.train", "-m", f"hydra/launcher={launcher}",
                           f"hydra.sweep.dir={sweep_dir}", *TINY, "compress/fwd=none,int8", *extra],
                          capture_output=True, text=True, timeout=900, cwd=sweep_dir.parent,
                          env={**os.environ, **(env or {})})


def summaries(sweep_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}


def _completed_with_progress(d, out):
    assert out.returncode == 0, out.stderr[-3000:]
    s = summaries(d)
    assert sorted(s) == ["0", "1"] and all(v["status"] == "completed" for v in s.values())
    assert {v["compress_fwd"] for v in s.values()} == {"none", "int8"}
    progress = json.loads((d / "progress.json").read_text())
    assert progress["done"] == progress["total"] == 2 and progress["skipped"] == 0


@pytest.mark.skipif(not SUBMITIT, reason="needs hydra-submitit-launcher (pip install -e '.[test]')")
@pytest.mark.timeout(600)  # a launcher's own start-up (Ray: ~3 min here) on a loaded 2-core machine
def test_submitit_launcher_runs_each_run_of_a_two_run_sweep_as_a_submitit_job(tmp_path):
    d = tmp_path / "s"
    out = two_run_sweep(d, "lowbw_submitit_local")
    _completed_with_progress(d, out)
    assert "Submitit 'local' sweep output dir" in out.stdout  # Hydra's log
    jobs = [j for j in (d / ".submitit").iterdir() if j.name != "%j"]
    assert len(jobs) == 2  # one job folder per run, each with submitit's pickled result and the run's log
    for j in jobs:
        assert list(j.glob("*_result.pkl")) and "lowbw run completed" in "".join(
            p.read_text() for p in j.glob("*_log.out"))


@pytest.mark.skipif(not RAY, reason="needs hydra-ray-launcher (pip install -e '.[test]')")
@pytest.mark.timeout(600)  # a launcher's own start-up (Ray: ~3 min here) on a loaded 2-core machine
def test_ray_launcher_runs_a_two_run_sweep_on_a_local_ray_instance(tmp_path):
    d = tmp_path / "s"
    # Ray's session folder holds unix sockets, whose paths must stay under ~107 bytes: a short folder in /tmp
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        out = two_run_sweep(d, "lowbw_ray", [f"+hydra.launcher.ray.init._temp_dir={ray_tmp}",
                                             "+hydra.launcher.ray.init.num_cpus=2",
                                             "+hydra.launcher.ray.init.include_dashboard=false"],
                            env={"RAY_AUTH_MODE": "disabled"})  # a local instance: no token written to ~/.ray
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    _completed_with_progress(d, out)
    assert "Ray Launcher is launching 2 jobs" in out.stdout  # Hydra's log
    assert "lowbw sweep: 2/2 runs done" in out.stderr  # the runs' progress, forwarded from Ray's workers


def test_sweep_progress_counts_runs_done_skipped_and_left(tmp_path):
    from omegaconf import OmegaConf

    from lowbw.report.progress import DONE_FILE, START_FILE, count_jobs, progress, progress_line

    cfg = OmegaConf.create({"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper."
                                                                "BasicSweeper", "params": {"schedule": "gpipe,1f1b"}},
                                      "overrides": {"task": ["net=home,lan,metro", "train.steps=3", "seed=1,2"]}}})
    assert count_jobs(cfg) == 12  # 2 schedules x 3 networks x 2 seeds
    cfg.hydra.overrides.task.append("schedule=zb_h1")  # the command line replaces the params' axis
    assert count_jobs(cfg) == 6
    (tmp_path / START_FILE).write_text(json.dumps({"start": 1000.0, "total": 6}))
    (tmp_path / DONE_FILE).write_text("".join(json.dumps(r) + "\n" for r in [
        {"job": 0, "ran": False, "status": "completed"},  # skipped on resume: takes no time
        {"job": 1, "ran": True, "status": "completed"}, {"job": 2, "ran": True, "status": "failed"}]))
    p = progress(tmp_path, now=1100.0)
    assert (p["done"], p["skipped"], p["failed"], p["elapsed_s"]) == (3, 1, 1, 100.0)
    assert p["left_s"] == pytest.approx(150.0)  # 100 s for 2 runs that ran, 3 runs left
    assert progress_line(p) == ("lowbw sweep: 3/6 runs done (1 skipped: already completed, 1 failed), "
                                "1m40s elapsed, about 2m30s left")


@pytest.mark.skipif(not SUBMITIT, reason="needs hydra-submitit-launcher (pip install -e '.[test]')")
@pytest.mark.timeout(600)  # a launcher's own start-up (Ray: ~3 min here) on a loaded 2-core machine
def test_slurm_launcher_runs_a_two_run_sweep_on_a_one_node_test_slurm(tmp_path):
    """lowbw_slurm end to end -- Hydra, the submitit plugin, sbatch, srun, submitit's job side -- against
    tests/fake_slurm/ (sbatch runs the job array on this machine, srun runs its command, sacct knows nothing)."""
    d = tmp_path / "s"
    fake = Path(__file__).parent / "fake_slurm"
    out = two_run_sweep(d, "lowbw_slurm", ["hydra.launcher.partition=debug"],
                        env={"PATH": f"{fake}:{os.environ['PATH']}", "FAKE_SLURM_DIR": str(tmp_path)})
    _completed_with_progress(d, out)
    assert "Submitit 'slurm' sweep output dir" in out.stdout
    [script] = tmp_path.glob("submitted_*.sh")  # one sbatch: the sweep is one job array
    sbatch = script.read_text()
    for line in ("--array=0-1%2", "--cpus-per-task=2", "--ntasks-per-node=1", "--nodes=1", "--partition=debug",
                 "--time=60", "--mem=8GB", "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in sbatch, line
    logs = "".join(p.read_text() for p in (d / ".submitit").glob("*_*/*_log.out"))
    assert logs.count("lowbw run completed") == 2  # each run's console went to its Slurm job's log

"""lowbw-train: train a small GPT pipeline-parallel across emulated internet links.

    lowbw-train                                   # 4 stages, home broadband, bundled corpus
    lowbw-train net=transatlantic schedule=gpipe model.n_layer=8 train.steps=50 clock=virtual
    lowbw-train -m net=datacenter,home schedule=gpipe,1f1b      # a sweep: one folder per run
    torchrun --nproc-per-node 4 -m lowbw.train train.steps=50   # the same under torchrun

Without torchrun this process validates the config, spawns one process per stage and watches
them; under torchrun every rank runs this app and joins the group torchrun made. Outputs land in
the Hydra run folder: config.yaml, provenance.json, metrics.jsonl, timeline.jsonl, tb/, summary.json.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import hydra
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import lowbw
from lowbw.boundary import build_method
from lowbw.checkpoint import checkpoint_dir, resume_step
from lowbw.config import register_configs
from lowbw.errors import ConfigError, ScheduleError
from lowbw.launch import RunFailed, mark_failed, spawn_and_supervise
from lowbw.logs import log
from lowbw.metrics.recorder import atomic_write_json, format_summary
from lowbw.metrics.tensorboard import run_name
from lowbw.models.flops import n_params
from lowbw.rank.process import run_rank
from lowbw.timing import describe
from lowbw.validation import Plan, validate


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(world: int, launcher: str) -> dict:
    return {
        "lowbw_version": lowbw.__version__,
        "git_commit": _git_commit(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "world_size": world,
        "launcher": launcher,
        "argv": sys.argv,
    }


register_configs()


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config ``lowbw-train <overrides>`` would run, composed without starting Hydra's app."""
    with initialize_config_module("lowbw_configs", version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides or []))


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Validate, spawn one process per stage, wait; return summary.json. Raises ConfigError / RunFailed."""
    plan = validate(cfg)
    _log_boundary(cfg, plan.schedule.n_stages)
    if cfg.resume:  # every rank's checkpoint must be readable before anything is touched
        resume_step(checkpoint_dir(cfg, run_dir), cfg.pipeline.stages)
    else:
        _set_aside_earlier_attempt(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_run_files(cfg, run_dir, cfg.pipeline.stages, "lowbw")
    summary_path = run_dir / "summary.json"
    try:
        spawn_and_supervise(OmegaConf.to_container(cfg, resolve=True), plan, cfg.pipeline.stages, run_dir,
                            _meta(cfg, cfg.pipeline.stages, plan))
    except RunFailed as e:
        mark_failed(run_dir, e.rank, str(e))
        raise
    summary = json.loads(summary_path.read_text())
    log.info("\n" + format_summary(summary))
    return summary


def _log_boundary(cfg: DictConfig, n_stages: int) -> None:
    """With a boundary method, its size and the model's parameters beside the dense model's (a comparison
    of methods should know whether it is parameter-matched)."""
    method = build_method(cfg.boundary, cfg.model, cfg.seed)
    if method.name == "none":
        return
    dense, delta = n_params(cfg.model), method.param_delta(n_stages)
    log.info(f"boundary={method.describe()}; {dense + delta:,} parameters ({delta:+,} against the dense "
             f"model's {dense:,})")


def _set_aside_earlier_attempt(run_dir: Path) -> None:
    """A fresh run into a folder that holds an earlier run moves that run's results to attempt<k>/."""
    names = ["summary.json", "metrics.jsonl", "timeline.jsonl", "tb", "errors", "checkpoints"]
    present = [n for n in names if (run_dir / n).exists()]
    if not present:
        return
    k = 1
    while (run_dir / f"attempt{k}").exists():
        k += 1
    (run_dir / f"attempt{k}").mkdir(parents=True)
    for n in present:
        os.replace(run_dir / n, run_dir / f"attempt{k}" / n)


def _meta(cfg: DictConfig, world: int, plan: Plan | None = None) -> dict:
    """What summary.json says about the run besides its numbers (``plan``: what the run's clock times)."""
    meta = {"world_size": world, "schedule": cfg.schedule.name, "net": cfg.net.name,
            "microbatches": cfg.pipeline.microbatches, "compress_fwd": cfg.compress.fwd.name,
            "compress_bwd": cfg.compress.bwd.name, "baseline_run": cfg.compress.baseline_run,
            "run_name": run_name(HydraConfig.get().job.override_dirname if HydraConfig.initialized() else "")}
    if plan is not None:
        meta["timing"] = describe(cfg, plan.profiles, plan.regime)
        if plan.regime is not None:
            meta["regime"] = plan.regime.to_dict()
    return meta


def _write_run_files(cfg: DictConfig, run_dir: Path, world: int, launcher: str) -> None:
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / "provenance.json").write_text(json.dumps(provenance(world, launcher), indent=2))


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _completed_summary(cfg: DictConfig, run_dir: Path) -> dict | None:
    """summary.json of a completed run of this same config in run_dir, else None."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        if summary.get("status") != "completed":
            return None
        saved = run_dir / "config.yaml"  # another config in this folder (another grid, same sweep dir): rerun

        def what_it_computes(c) -> dict:  # the config minus settings that do not change a run's results
            d = OmegaConf.to_container(c, resolve=True)
            return {k: v for k, v in d.items() if k not in ("resume", "progress", "timeout_s")}

        if saved.is_file() and what_it_computes(OmegaConf.load(saved)) != what_it_computes(cfg):
            return None
        return summary
    except Exception:  # noqa: BLE001 - unreadable or half-written: run again
        return None


def _sweep_job(cfg: DictConfig, run_dir: Path) -> dict:
    """One run of a sweep (lowbw-train -m ...). A folder already holding a completed run of this config is
    skipped (resume: rerun the sweep with hydra.sweep.dir=<its folder>); a failure of any kind is recorded
    in the run's summary.json (status failed, error) and returned, so that the other runs go on."""
    if multiprocessing.get_start_method(allow_none=True) not in (None, "spawn", "fork", "forkserver"):
        # a joblib (loky) worker: its start method "loky" is unknown to the stage processes spawned below
        multiprocessing.set_start_method("spawn", force=True)
    done = _completed_summary(cfg, run_dir)
    if done is not None:
        log.warning(f"lowbw: {run_dir} already holds a completed run of this config; skipped")
        return done
    if cfg.get("resume"):  # `-m ... resume=true`: runs with checkpoints continue, the others start afresh
        try:
            resume_step(checkpoint_dir(cfg, run_dir), cfg.pipeline.stages)
        except ConfigError:
            cfg = cfg.copy()
            cfg.resume = False
    try:
        return run(cfg, run_dir)
    except Exception as e:  # noqa: BLE001 - one run's failure must not stop the sweep
        message = f"{type(e).__name__}: {e}"
        log.error(f"lowbw: run failed: {message}\n  outputs kept in {run_dir}; the sweep goes on")
        run_dir.mkdir(parents=True, exist_ok=True)
        base = {"status": "failed"}
        try:
            base.update(clock=cfg.clock.name, steps=cfg.train.steps, **_meta(cfg, cfg.pipeline.stages))
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        except Exception:  # noqa: BLE001 - a config too broken to describe: the error says why
            pass
        path = run_dir / "summary.json"
        kept = {}
        if getattr(e, "rank", None) is not None:  # RunFailed: keep what the run's rank 0 wrote
            try:
                kept = json.loads(path.read_text())
            except (OSError, ValueError):
                kept = {}
        atomic_write_json(path, {**base, **kept})
        mark_failed(run_dir, getattr(e, "rank", None), message)
        return json.loads(path.read_text())


@hydra.main(config_path="pkg://lowbw_configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    torchrun = under_torchrun()
    world = int(os.environ["WORLD_SIZE"]) if torchrun else cfg.pipeline.stages
    run_dir = Path(cfg.out_dir) if cfg.out_dir else Path(HydraConfig.get().runtime.output_dir)
    if not torchrun and _in_multirun():
        return _sweep_job(cfg, run_dir)
    try:
        if not torchrun:
            return run(cfg, run_dir)
        plan = validate(cfg, world_size=world)
    except (ConfigError, ScheduleError) as e:
        log.error(f"lowbw: configuration error: {e}")
        sys.exit(2)
    except RunFailed as e:
        log.error(f"lowbw: run failed: {e}\n  outputs kept in {run_dir}")
        sys.exit(1)
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_run_files(cfg, run_dir, world, "torchrun")
    summary = run_rank(OmegaConf.to_container(cfg, resolve=True), plan, rank, world,
                       str(run_dir) if rank == 0 else None, int(os.environ.get("LOCAL_RANK", 0)),
                       _meta(cfg, world, plan))
    if summary is not None:
        log.info("\n" + format_summary(summary))
    return None


if __name__ == "__main__":
    main()

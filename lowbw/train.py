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
import traceback
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
from lowbw.config import plain, register_configs
from lowbw.errors import EXIT_CONFIG, EXIT_DIVERGED, EXIT_FAILED, ConfigError, Diverged, Interrupted, ScheduleError
from lowbw.launch import RunFailed, record_outcome, spawn_and_supervise
from lowbw.logs import log
from lowbw.metrics.files import OutputError, atomic_write_json, atomic_write_text
from lowbw.metrics.recorder import format_summary
from lowbw.metrics.tensorboard import run_name
from lowbw.models.flops import n_params
from lowbw.rank.process import run_rank
from lowbw.replicas import Layout
from lowbw.replicas.layout import replica_count
from lowbw.run_folder import check_resume, prepare, set_aside
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
    """Validate, prepare the folder, spawn one process per stage, wait; return summary.json.

    Raises ConfigError (nothing started, nothing in the folder changed), RunFailed, Diverged or
    Interrupted -- each recorded in summary.json first."""
    plan = validate(cfg)
    _log_boundary(cfg, plan.schedule.n_stages)
    world = cfg.pipeline.stages * replica_count(cfg)
    prepare(cfg, run_dir, world)
    _write_run_files(cfg, run_dir, world, "lowbw")
    meta = _meta(cfg, world, plan, plan.warnings)
    try:
        spawn_and_supervise(OmegaConf.to_container(cfg, resolve=True), plan, world, run_dir, meta)
    except RunFailed as e:
        layout = Layout(cfg.pipeline.stages, replica_count(cfg))
        if e.rank is not None and layout.replicas > 1:  # which replica, and where in its pipeline
            e = RunFailed(e.rank, f"{e} [{layout.describe(e.rank)}]", e.link)
        _record(run_dir, meta, "failed", str(e), failed_rank=e.rank, failed_link=e.link)
        raise e from None
    except Diverged as e:
        _record(run_dir, meta, "diverged", str(e), diverged_step=e.step)
        raise
    except Interrupted as e:
        _record(run_dir, meta, "interrupted", str(e))
        raise
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError) as e:
        raise RunFailed(0, f"every rank finished but {run_dir / 'summary.json'} cannot be read ({e})") from None
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


def _record(run_dir: Path, meta: dict, status: str, message: str, **fields) -> None:
    """Record how the run ended in summary.json; if even that cannot be written, say so (the exit code is
    non-zero anyway)."""
    try:
        record_outcome(run_dir, status, message, {"clock": None, **meta}, **fields)
    except OutputError as e:
        log.error(f"lowbw: the run's end ({status}) could not be recorded: {e}")


def _meta(cfg: DictConfig, world: int, plan: Plan | None = None, warnings: tuple[str, ...] = ()) -> dict:
    """What summary.json says about the run besides its numbers (``plan``: what the run's clock times;
    ``warnings``: said now, and kept)."""
    for w in warnings:
        log.warning(f"lowbw: warning: {w}")
    meta = {"warnings": list(warnings), "world_size": world, "schedule": cfg.schedule.name, "net": cfg.net.name,
            "microbatches": cfg.pipeline.microbatches, "compress_fwd": cfg.compress.fwd.name,
            "compress_bwd": cfg.compress.bwd.name, "baseline_run": cfg.compress.baseline_run,
            "run_name": run_name(HydraConfig.get().job.override_dirname if HydraConfig.initialized() else ""),
            "stages": cfg.pipeline.stages, "replicas": replica_count(cfg),
            "sync": plain(cfg.replicas.sync) if replica_count(cfg) > 1 else None}
    if plan is not None:
        meta["timing"] = describe(cfg, plan.profiles, plan.regime)
        if plan.regime is not None:
            meta["regime"] = plan.regime.to_dict()
    return meta


def _write_run_files(cfg: DictConfig, run_dir: Path, world: int, launcher: str) -> None:
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_json(run_dir / "provenance.json", provenance(world, launcher))


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
            check_resume(cfg, run_dir, cfg.pipeline.stages * replica_count(cfg))
        except ConfigError:
            cfg = cfg.copy()
            cfg.resume = False
    try:
        return run(cfg, run_dir)
    except Exception as e:  # noqa: BLE001 - one run's failure must not stop the sweep (a stop signal does)
        return _sweep_failure(cfg, run_dir, e)


def _sweep_failure(cfg: DictConfig, run_dir: Path, e: Exception) -> dict:
    """The summary of a sweep's run that did not complete. run() recorded failures of a started run; a
    run that never started (bad config) is recorded here, after an earlier run's files are set aside."""
    log.error(f"lowbw: run {'diverged' if isinstance(e, Diverged) else 'failed'}: {_sentence(e)}\n"
              f"  outputs kept in {run_dir}; the sweep goes on")
    path = run_dir / "summary.json"
    if isinstance(e, (RunFailed, Diverged)):  # a started run: run() recorded it
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    base = {"status": "failed", "error": _sentence(e), "failed_rank": getattr(e, "rank", None)}
    try:
        base.update(clock=cfg.clock.name, steps=cfg.train.steps, **_meta(cfg, cfg.pipeline.stages * replica_count(cfg)))
    except Exception:  # noqa: BLE001 - a config too broken to describe: the error says why
        pass
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not isinstance(e, (RunFailed, Diverged)):
            set_aside(run_dir)  # never write a failure over an earlier run's summary
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write_json(path, base)
    except OSError as write_error:
        log.error(f"lowbw: the failure could not be recorded in {path}: {write_error}")
    return base


def _sentence(e: BaseException) -> str:
    if isinstance(e, (ConfigError, ScheduleError, RunFailed, Diverged, Interrupted, OSError)):
        return str(e)
    return f"{type(e).__name__}: {e}"


def _exit(e: BaseException, run_dir: Path) -> int:
    """Print the one sentence a user reads for ``e`` (and the traceback with LOWBW_TRACEBACK=1); return the
    exit code (lowbw.errors)."""
    if os.environ.get("LOWBW_TRACEBACK"):
        traceback.print_exception(e)
    if isinstance(e, (ConfigError, ScheduleError)):
        log.error(f"lowbw: configuration error: {e}")
        return EXIT_CONFIG
    if isinstance(e, Interrupted):
        log.error(f"lowbw: {e}; summary.json in {run_dir} records the run as interrupted")
        return e.exit_code
    if isinstance(e, KeyboardInterrupt):
        log.error("lowbw: interrupted before the run started")
        return 130
    if isinstance(e, Diverged):
        log.error(f"lowbw: run diverged: {e}\n  outputs kept in {run_dir}")
        return EXIT_DIVERGED
    if isinstance(e, (RunFailed, OSError)):
        log.error(f"lowbw: run failed: {e}\n  outputs kept in {run_dir}")
        return EXIT_FAILED
    log.error(f"lowbw: internal error: {_sentence(e)} (LOWBW_TRACEBACK=1 prints where)")
    return EXIT_FAILED


def _torchrun_rank(cfg: DictConfig, run_dir: Path) -> None:
    """Under torchrun: validate (every rank), prepare the folder (rank 0), then be this process's rank."""
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ.get("RANK", 0))
    if cfg.net.backend == "kernel":
        raise ConfigError("net.backend=kernel puts the ranks lowbw's own launcher starts into network namespaces; "
                          "under torchrun the ranks are torchrun's: run lowbw-train without torchrun (as root), or "
                          "shape the real interfaces yourself and use net.emulate=false")
    plan = validate(cfg, world_size=world)
    if rank == 0:
        prepare(cfg, run_dir, world)
        _write_run_files(cfg, run_dir, world, "torchrun")
    summary = run_rank(OmegaConf.to_container(cfg, resolve=True), plan, rank, world,
                       str(run_dir) if rank == 0 else None, int(os.environ.get("LOCAL_RANK", 0)),
                       _meta(cfg, world, plan, plan.warnings if rank == 0 else ()))
    if summary is not None:
        log.info("\n" + format_summary(summary))


@hydra.main(config_path="pkg://lowbw_configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    run_dir = Path(cfg.out_dir) if cfg.out_dir else Path(HydraConfig.get().runtime.output_dir)
    try:
        if under_torchrun():
            return _torchrun_rank(cfg, run_dir)
        if _in_multirun():
            return _sweep_job(cfg, run_dir)
        return run(cfg, run_dir)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 -- every way a run ends becomes a sentence and an exit code
        sys.exit(_exit(e, run_dir))


if __name__ == "__main__":
    main()

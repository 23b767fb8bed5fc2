"""Search instead of grid: an objective for Hydra's Optuna sweeper.

    pip install hydra-optuna-sweeper
    python -m lowbw.report.search +experiment=codec_search            # configs/experiment/codec_search.yaml
    lowbw-report outputs/sweeps/codec_search/<date_time>

Each trial is an ordinary lowbw-train run of the trial's config (same folders, resume and failure handling
as ``lowbw-train -m``). Its value for the sweeper (maximised) is

* the run's tokens/s when its loss gap -- validation loss (training loss if none) minus that of the
  uncompressed run with the same config -- is at most ``LOWBW_MAX_LOSS_GAP`` (default 0.05 nats/token);
* ``-gap`` when the gap is larger: below every feasible trial, and better the closer it comes to the bound;
* ``FAILED_VALUE`` when the run failed.

The uncompressed twin is run once per distinct config, in ``<sweep dir>/baselines/<hash>/`` (under a file
lock, so parallel trials share it), and appears in the sweep's report as the baseline of every trial.
Every trial also writes ``objective.json`` (value, gap, bound, baseline) in its run folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from lowbw.train import _sweep_job  # noqa: F401  (also registers the config schema and resolvers)

MAX_GAP_ENV = "LOWBW_MAX_LOSS_GAP"
DEFAULT_MAX_GAP = 0.05
FAILED_VALUE = -1.0e6


def final_loss(summary: Optional[dict]) -> Optional[float]:
    if not summary:
        return None
    for key in ("val_loss", "train_loss"):
        v = summary.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            return float(v)
    return None


def objective(summary: dict, baseline: Optional[dict], max_gap: float) -> tuple[float, Optional[float]]:
    """(value to maximise, loss gap). See the module docstring."""
    tps = summary.get("tokens_per_s")
    if summary.get("status") != "completed" or not isinstance(tps, (int, float)) or not math.isfinite(tps):
        return FAILED_VALUE, None
    loss, base = final_loss(summary), final_loss(baseline)
    if loss is None or base is None:  # no loss to compare: cannot tell whether the bound holds
        return FAILED_VALUE, None
    gap = loss - base
    return (float(tps) if gap <= max_gap else -gap), gap


def uncompressed_twin(cfg: DictConfig) -> DictConfig:
    twin = cfg.copy()
    with open_dict(twin):
        twin.compress.fwd = {"name": "none"}
        twin.compress.bwd = {"name": "none"}
    return twin


def baseline_summary(cfg: DictConfig, sweep_dir: Path) -> dict:
    """Run (once per distinct config, shared by parallel trials) and return the uncompressed twin's summary."""
    import fcntl

    twin = uncompressed_twin(cfg)
    key = hashlib.sha1(OmegaConf.to_yaml(twin, resolve=True).encode()).hexdigest()[:10]
    run_dir = sweep_dir / "baselines" / key
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _sweep_job(twin, run_dir)  # skipped when already completed
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@hydra.main(config_path="pkg://lowbw_configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    run_dir = Path(cfg.out_dir) if cfg.out_dir else Path(hc.runtime.output_dir)
    summary = _sweep_job(cfg, run_dir)
    max_gap = float(os.environ.get(MAX_GAP_ENV, DEFAULT_MAX_GAP))
    baseline = baseline_summary(cfg, Path(hc.sweep.dir)) if summary.get("status") == "completed" else None
    value, gap = objective(summary, baseline, max_gap)
    record = {"value": value, "tokens_per_s": summary.get("tokens_per_s"), "loss_gap": gap, "max_loss_gap": max_gap,
              "feasible": gap is not None and gap <= max_gap,
              "baseline_run": (baseline or {}).get("run_dir"), "status": summary.get("status")}
    (run_dir / "objective.json").write_text(json.dumps(record, indent=2))
    print(f"lowbw search: {run_dir}: value {value:.6g} (tokens/s {summary.get('tokens_per_s')}, loss gap {gap}, "
          f"bound {max_gap})", file=sys.stderr)
    return value


def needs_missing_sweeper(argv: list[str]) -> bool:
    """Whether the command line asks for Hydra's Optuna sweeper (``+experiment=codec_search`` or
    ``hydra/sweeper=optuna``) and it is not installed: Hydra would only say it "could not find
    'hydra/sweeper/optuna'"."""
    import importlib.util

    wants = any(a.endswith(("experiment=codec_search", "hydra/sweeper=optuna")) for a in argv)
    return wants and importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None


def cli() -> None:
    if needs_missing_sweeper(sys.argv[1:]):
        print("lowbw search: this search runs under Hydra's Optuna sweeper, which is not installed: "
              "pip install hydra-optuna-sweeper", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()

"""lowbw-report: one table and six figures (PNG, with a PDF of each beside it) from a sweep folder.

    lowbw-train -m net=datacenter,home compress/fwd=none,int8 schedule=gpipe,1f1b
    lowbw-report outputs/sweeps/2025-01-31/12-00-00            # -> report.md, report.csv, *.png, *.pdf in that folder
    lowbw-report outputs/sweeps/... --out reports/first-sweep  # elsewhere

Reads every run folder under the sweep (summary.json, config.yaml, metrics.jsonl, .hydra/overrides.yaml),
training and simulator sweeps alike; see docs/sweeps.md for the columns and figures.

The names below load on first use: every ``lowbw-train`` start loads this package's sweep-progress callback
(:mod:`lowbw.report.progress`), which must not pay for matplotlib.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {"COLUMNS": "collect", "KEYS": "collect", "collect_runs": "collect", "find_run_dirs": "collect",
          "PLOTS": "plots", "pareto_front": "plots", "write_plots": "plots", "main": "write",
          "write_report": "write"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"lowbw.report.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'lowbw.report' has no attribute {name!r}")

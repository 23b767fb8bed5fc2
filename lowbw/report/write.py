"""report.md and report.csv of a sweep, and the ``lowbw-report`` command (see :mod:`lowbw.report`)."""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

from lowbw.report.collect import COLUMNS, KEYS, collect_runs, find_run_dirs, rank_by_target
from lowbw.report.plots import PLOTS, loss_column, write_plots

LOSS_KEYS = ("train_loss", "val_loss", "train_loss_gap", "val_loss_gap", "baseline_run")
_FMT = dict((k, f) for k, _, f in COLUMNS)
_HEAD = dict((k, h) for k, h, _ in COLUMNS)
# report.md's main table; report.csv has every column
MAIN = ["run", "status", "network", "bandwidth_mbps", "codec", "schedule", "tokens_per_s", "j_per_token",
        "compute_j_per_token", "idle_j_per_token", "network_j_per_token", "bytes_per_token", "bubble_fraction",
        "train_loss", "val_loss", "val_loss_gap"]
# report.md's ranking by time to the target validation loss (runs with train.target_loss)
TARGET = ["run", "network", "bandwidth_mbps", "codec", "schedule", "target_loss", "target_reached", "target_step",
          "target_time_s", "target_energy_j", "target_time_interp_s", "target_energy_interp_j", "target_wall_s",
          "best_val_loss"]
CODEC = ["run", "codec", "fwd_ratio", "fwd_rel_error", "fwd_encode_ms", "fwd_decode_ms", "bwd_ratio",
         "bwd_rel_error", "bwd_encode_ms", "bwd_decode_ms"]

GLOSSARY = {
    "run": "run folder, relative to the sweep folder (Hydra job number)",
    "status": "completed | failed (see error) | interrupted (SIGINT/SIGTERM) | diverged (loss or gradients not "
              "finite) | incomplete (no summary.json: killed or still running)",
    "network": "net preset name (net.name)",
    "bandwidth_mbps": "bottleneck bandwidth of the links the pipeline uses (stage i <-> i+1), Mbit/s, from the run's net config",
    "latency_ms": "mean one-way latency of those links, ms",
    "codec_fwd / codec_bwd": "codec of forward activations / backward activation-gradients (compress/fwd, compress/bwd)",
    "codec": "fwd/bwd label; a codec's parameters are shown when they vary within the sweep",
    "tokens_per_s": "training throughput, tokens/s on the run's clock (virtual = event time, wall = real time); "
                    "warm-up steps excluded. tokens_per_s_wall: the same on the wall clock",
    "j_per_token": "energy per token, J (compute + idle + network); energy_source says modelled or measured. "
                   "measured_j_per_token: metered device energy (compute + idle only), when measured",
    "bytes_per_token": "bytes sent over all links per training token",
    "replicas / sync": "copies of the pipeline (replicas.count) and how they agree (replicas/sync, none for a single "
                       "pipeline; docs/replicas.md)",
    "sync_bytes_per_token": "of bytes_per_token, those between a stage's replicas",
    "bubble_fraction": "share of rank-seconds not spent computing (0 = no bubble)",
    "train_loss / val_loss": "final training / validation cross-entropy, nats/token",
    "train_loss_gap / val_loss_gap": "loss minus the loss of the uncompressed run (both codecs none) with the same "
                                     "training config (network, schedule, seed, model, steps) in this sweep "
                                     "(baseline_run); positive = compression hurt",
    "target_*": "time and energy to the target validation loss (train.target_loss), counted from the run's start: "
                "at the first evaluation at or below the target (step, tokens, run-clock s, wall s, modelled J; "
                "an upper bound, exact to the evaluation cadence) and interpolated linearly in the loss between "
                "that evaluation and the one before (an estimate). best_val_loss: the lowest validation loss seen",
    "timing": "what the run's clock timed, and whether its figures are the same on every machine",
    "fwd_* / bwd_*": "codec statistics, message-weighted mean over pipeline boundaries: ratio (raw/wire bytes), "
                     "rel_error (relative reconstruction error), encode/decode ms per message",
    "overrides": "the run's Hydra overrides",
}


def _cell(v: Any, spec: str) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if spec == "s":
        return str(v)
    try:
        return format(int(v), spec) if spec == "d" else format(float(v), spec)
    except (TypeError, ValueError):
        return str(v)


def _md_escape(s: str, limit: Optional[int] = None) -> str:
    s = s.replace("|", "\\|").replace("\n", " ")
    return s if limit is None or len(s) <= limit else s[: limit - 1] + "…"


def _md_table(rows: list[dict], keys: list[str], heads: dict[str, str]) -> list[str]:
    out = ["| " + " | ".join(heads.get(k, _HEAD.get(k, k)) for k in keys) + " |",
           "|" + "|".join("---" if _FMT.get(k, "s") == "s" else "---:" for k in keys) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_md_escape(_cell(r.get(k), _FMT.get(k, "s")), 120) for k in keys) + " |")
    return out


def _target_section(rows: list[dict], clocks: list[str]) -> list[str]:
    """report.md's ranking of the runs that had a target loss (none: no section)."""
    ranked = rank_by_target(rows)
    if not ranked:
        return []
    md = ["## Time to target loss", "",
          f"Ranked by run-clock time ({'/'.join(clocks) or '?'} clock) to the first evaluation at or below the "
          "target validation loss; runs that did not reach it follow, by best validation loss.", ""]
    md += _md_table(ranked, TARGET, {}) + [""]
    timings = sorted({r["timing"] for r in ranked if r.get("timing")})
    if timings:  # projected (a regime) or not, machine-dependent or not: said once per kind
        md += ["What the runs' clocks timed:", ""] + [f"- {_md_escape(t)}" for t in timings] + [""]
    return md


def write_report(root: Path, out: Optional[Path] = None, plots: bool = True) -> dict:
    """Write report.csv, report.md and the PNG figures for the sweep folder ``root`` (into ``out``, default
    ``root``). Returns {"rows", "columns", "csv", "md", "plots", "skipped_plots"}."""
    root = Path(root)
    out = Path(out) if out is not None else root
    out.mkdir(parents=True, exist_ok=True)
    rows = collect_runs(root)
    has_loss = loss_column(rows) is not None or any(r.get("train_loss") is not None or r.get("val_loss") is not None
                                                   for r in rows)
    columns = [k for k in KEYS if has_loss or k not in LOSS_KEYS]

    csv_path = out / "report.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if r.get(k) is None else r[k] for k in columns])

    written, skipped = write_plots(rows, out) if plots else ({}, {})

    clocks = sorted({r["clock"] for r in rows if r.get("clock")})
    sources = sorted({r["energy_source"] for r in rows if r.get("energy_source")})
    n = {s: sum(r["status"] == s for r in rows) for s in ("completed", "failed", "interrupted", "diverged", "incomplete")}
    heads = {"tokens_per_s": f"tokens/s ({'/'.join(clocks) or '?'} clock)",
             "j_per_token": f"J/token ({'/'.join(sources) or 'n/a'})"}
    md = [f"# lowbw sweep report: `{root}`", "",
          f"{len(rows)} runs: {n['completed']} completed, {n['failed']} failed, {n['interrupted']} interrupted, "
          f"{n['diverged']} diverged, {n['incomplete']} incomplete. "
          f"Clock: {', '.join(clocks) or 'n/a'}. Energy: {', '.join(sources) or 'not recorded'}. "
          f"Every column of every run is in `{csv_path.name}`.", ""]
    main_keys = [k for k in MAIN if k in columns]
    md += ["## Runs", ""] + _md_table(rows, main_keys, heads) + [""]
    md += _target_section(rows, clocks)
    if any(r.get(k) is not None for r in rows for k in CODEC[2:]):
        md += ["## Compression (mean over pipeline boundaries)", ""] + _md_table(rows, CODEC, {}) + [""]
        if any(r.get("fwd_ratio") is not None and r.get("fwd_encode_ms") is None for r in rows):
            md += ["Encode and decode times are blank for runs whose clock charges codec work 0 s (planned "
                   "durations: `clock.durations=flops` or `fixed`, a regime); `scripts/bench_codecs.py` times the "
                   "codecs on this machine.", ""]
    failed = [r for r in rows if r["status"] != "completed"]
    if failed:
        md += ["## Runs that did not complete", ""]
        for r in failed:
            what = f"{r.get('network')} / {r.get('codec')} / {r.get('schedule')}"
            md.append(f"- `{r['run']}` ({what}): **{r['status']}**"
                      + (f" -- {_md_escape(str(r['error']))}" if r.get("error") else "")
                      + (f"  \n  overrides: `{r['overrides']}`" if r.get("overrides") else ""))
        md.append("")
    if written or skipped:
        md += ["## Figures", ""]
        for name, path in written.items():
            rel = Path(path).relative_to(out)
            md += [f"![{name.replace('_', ' ')}]({rel.as_posix()})", "",
                   f"(vector copy for a paper: `{rel.with_suffix('.pdf').as_posix()}`)", ""]
        for name, why in skipped.items():
            md += [f"- {PLOTS[name]} not drawn: {why}", ""]
    md += ["## Columns", ""] + [f"- `{k}`: {v}" for k, v in GLOSSARY.items()
                                if has_loss or not any(x in k for x in ("loss",))] + [""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))
    return {"rows": rows, "columns": columns, "csv": csv_path, "md": md_path, "plots": written,
            "skipped_plots": skipped}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="lowbw-report", description="Report of a lowbw sweep: report.md, report.csv "
                                 "and figures (PNG + PDF) from every run folder under SWEEP.")
    ap.add_argument("sweep", type=Path, help="sweep folder (e.g. outputs/sweeps/2025-01-31/12-00-00) or one run folder")
    ap.add_argument("--out", type=Path, default=None, help="where to write the report (default: the sweep folder)")
    ap.add_argument("--no-plots", action="store_true", help="write the tables only")
    args = ap.parse_args(argv)
    if not args.sweep.is_dir():
        print(f"lowbw-report: {args.sweep} is not a folder", file=sys.stderr)
        return 2
    if not find_run_dirs(args.sweep):
        print(f"lowbw-report: no run folders (summary.json, metrics.jsonl, config.yaml) under {args.sweep}",
              file=sys.stderr)
        return 1
    try:
        rep = write_report(args.sweep, args.out, plots=not args.no_plots)
    except OSError as e:
        print(f"lowbw-report: could not write the report: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 -- a sentence, the traceback only when asked for
        if os.environ.get("LOWBW_TRACEBACK"):
            traceback.print_exc()
        print(f"lowbw-report: could not read the runs under {args.sweep}: {type(e).__name__}: {e} "
              "(LOWBW_TRACEBACK=1 prints where)", file=sys.stderr)
        return 1
    rows = rep["rows"]
    n_ok = sum(r["status"] == "completed" for r in rows)
    print(f"lowbw-report: {len(rows)} runs ({n_ok} completed, {len(rows) - n_ok} not)")
    print(f"  {rep['md']}\n  {rep['csv']}")
    for p in rep["plots"].values():
        print(f"  {p}")
    for name, why in rep["skipped_plots"].items():
        print(f"  ({PLOTS[name]} not drawn: {why})")
    return 0

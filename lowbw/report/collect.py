"""Read a sweep's run folders into one row per run.

A run folder is any folder under the sweep holding ``summary.json``, ``metrics.jsonl``, ``config.yaml``
or Hydra's ``.hydra/`` (a run that never wrote a summary -- interrupted, or still running -- is listed
as ``incomplete``). Every field is optional: a simulator's summary without losses, a run from before
energy accounting, a failed run with nothing but an error -- each gives a row with empty cells where
the numbers are missing.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from lowbw.metrics.files import read_json_lines

# lowbw.timing.PLANNED, which would pull torch into the report (tests/test_report.py checks they agree)
PLANNED = frozenset({"flops", "fixed", "regime"})

# (key, markdown heading, format) -- report.csv has the keys as its header, in this order.
COLUMNS: list[tuple[str, str, str]] = [
    ("run", "run", "s"),
    ("status", "status", "s"),
    ("network", "network", "s"),
    ("bandwidth_mbps", "bottleneck Mbit/s", "g"),
    ("latency_ms", "latency ms", "g"),
    ("codec_fwd", "codec fwd", "s"),
    ("codec_bwd", "codec bwd", "s"),
    ("codec", "codec (fwd/bwd)", "s"),
    ("schedule", "schedule", "s"),
    ("stages", "stages", "d"),
    ("replicas", "replicas", "d"),
    ("sync", "replica sync", "s"),
    ("microbatches", "microbatches", "d"),
    ("seed", "seed", "d"),
    ("clock", "clock", "s"),
    ("tokens_per_s", "tokens/s", ",.1f"),
    ("tokens_per_s_wall", "tokens/s (wall)", ",.1f"),
    ("j_per_token", "J/token", ".4g"),
    ("compute_j_per_token", "compute J/token", ".3g"),
    ("idle_j_per_token", "idle J/token", ".3g"),
    ("network_j_per_token", "network J/token", ".3g"),
    ("energy_source", "energy", "s"),
    ("measured_j_per_token", "measured device J/token", ".3g"),
    ("bytes_per_token", "bytes/token", ",.1f"),
    ("sync_bytes_per_token", "of which replicas", ",.1f"),
    ("bubble_fraction", "bubble", ".3f"),
    ("train_loss", "train loss", ".4f"),
    ("val_loss", "val loss", ".4f"),
    ("train_loss_gap", "train loss gap", "+.3g"),
    ("val_loss_gap", "val loss gap", "+.3g"),
    ("baseline_run", "baseline run", "s"),
    ("target_loss", "target val loss", "g"),
    ("target_reached", "reached", "s"),
    ("target_step", "step at target", "d"),
    ("target_tokens", "tokens at target", ",.0f"),
    ("target_time_s", "time to target s", ",.4g"),
    ("target_wall_s", "wall s to target", ",.4g"),
    ("target_energy_j", "J to target", ",.4g"),
    ("target_time_interp_s", "time to target s (interp.)", ",.4g"),
    ("target_energy_interp_j", "J to target (interp.)", ",.4g"),
    ("best_val_loss", "best val loss", ".4f"),
    ("timing", "timing", "s"),
    ("fwd_ratio", "fwd ratio", ".3g"),
    ("fwd_rel_error", "fwd rel. error", ".2e"),
    ("fwd_encode_ms", "fwd encode ms", ".3g"),
    ("fwd_decode_ms", "fwd decode ms", ".3g"),
    ("bwd_ratio", "bwd ratio", ".3g"),
    ("bwd_rel_error", "bwd rel. error", ".2e"),
    ("bwd_encode_ms", "bwd encode ms", ".3g"),
    ("bwd_decode_ms", "bwd decode ms", ".3g"),
    ("steps_completed", "steps done", "d"),
    ("steps", "steps", "d"),
    ("overrides", "overrides", "s"),
    ("error", "error", "s"),
]
KEYS = [c[0] for c in COLUMNS]

# Config keys that do not change what a run learns: ignored when pairing a run with its uncompressed twin.
_NOT_TRAINING = ("compress.", "out_dir", "progress", "timeout_s", "device", "backend", "energy.", "hardware.",
                 "clock.", "faults.")


_NOT_RUNS = {"tb", "checkpoints", "errors"}


def find_run_dirs(root: Path) -> list[Path]:
    root = Path(root)
    found: set[Path] = set()
    for name in ("summary.json", "metrics.jsonl", "config.yaml"):
        for f in root.rglob(name):
            parts = f.relative_to(root).parts[:-1]
            if any(p.startswith(".") or p in _NOT_RUNS or re.fullmatch(r"attempt\d+", p) for p in parts):
                continue  # hidden folders, TensorBoard, checkpoints, earlier attempts set aside by a rerun
            found.add(f.parent)
    for f in root.rglob("overrides.yaml"):
        parts = f.relative_to(root).parts[:-2]
        if f.parent.name == ".hydra" and not any(p.startswith(".") or re.fullmatch(r"attempt\d+", p) for p in parts):
            found.add(f.parent.parent)
    return sorted(found, key=lambda d: _natural(d.relative_to(root).as_posix()))


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _read_json(path: Path) -> Optional[dict]:
    try:
        obj = json.loads(path.read_text())
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.load(path)
    except Exception:  # noqa: BLE001 - a broken file is an empty one here
        return None
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:  # noqa: BLE001 - unresolvable interpolations (e.g. ${hydra:...}): keep them as text
        return OmegaConf.to_container(node, resolve=False)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl: JSON objects with an integer step; anything else (a line cut by a crash,
    a file that is not text) is left out."""
    return [r for r in read_json_lines(path) if isinstance(r.get("step"), int) and not isinstance(r["step"], bool)]


def _get(d: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _num(v: Any) -> Optional[float]:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = json.dumps(d, sort_keys=True) if isinstance(d, (list, dict)) else d
    return out


def network_figures(cfg: dict, summary: dict) -> tuple[Optional[float], Optional[float]]:
    """(bottleneck bandwidth Mbit/s, mean one-way latency ms) over the links the pipeline uses:
    stage i <-> i+1 both ways (and last -> first for interleaved schedules)."""
    bw = _num(summary.get("bottleneck_mbps", summary.get("bandwidth_mbps")))
    lat = _num(summary.get("latency_ms"))
    net = cfg.get("net") if isinstance(cfg, dict) else None
    if not isinstance(net, dict) or (bw is not None and lat is not None):
        return bw, lat
    stages = int(_num(_get(cfg, "pipeline.stages")) or summary.get("world_size") or 2)
    try:
        from omegaconf import OmegaConf

        from lowbw.net.topology import MBIT, Topology

        topo = Topology.from_config(OmegaConf.create(net), max(2, stages), seed=int(cfg.get("seed") or 0))
        pairs = [(i, i + 1) for i in range(topo.n - 1)]
        if (_num(_get(cfg, "schedule.virtual_stages")) or 1) > 1:
            pairs.append((topo.n - 1, 0))
        links = [topo.link(a, b) for a, b in pairs] + [topo.link(b, a) for a, b in pairs]
        eff = [min(link.bandwidth_bps, topo.uplink_bps[a], topo.downlink_bps[b])
               for link, (a, b) in zip(links, pairs + [(b, a) for a, b in pairs])]
        if bw is None:
            bw = min(eff) / MBIT
        if lat is None:
            lat = sum(link.latency_s for link in links) / len(links) * 1e3
    except Exception:  # noqa: BLE001 - an unusual net node: fall back on the node caps
        if bw is None:
            caps = [_num(net.get(k)) for k in ("uplink_mbps", "downlink_mbps")]
            caps = [c for c in caps if c is not None]
            bw = min(caps) if caps else None
        if lat is None:
            lat = _num(net.get("latency_ms"))
    return bw, lat


def _codec_stats(compression: Any, direction: str) -> dict[str, Optional[float]]:
    """Message-weighted means over the boundaries of one direction ("0.fwd", "1.fwd", ...)."""
    out: dict[str, Optional[float]] = {f"{direction}_{k}": None for k in ("ratio", "rel_error", "encode_ms", "decode_ms")}
    if not isinstance(compression, dict):
        return out
    entries = [v for k, v in compression.items() if isinstance(v, dict) and str(k).split(".")[-1] == direction]
    for field, key, scale in (("ratio", "ratio", 1.0), ("rel_error", "rel_error", 1.0),
                              ("encode_s", "encode_ms", 1e3), ("decode_s", "decode_ms", 1e3)):
        vals = [(_num(e.get(field)), _num(e.get("messages")) or 1.0) for e in entries]
        vals = [(v, w) for v, w in vals if v is not None]
        if vals:
            out[f"{direction}_{key}"] = scale * sum(v * w for v, w in vals) / sum(w for _, w in vals)
    return out


def _target_columns(target: Any) -> dict[str, Any]:
    """The target_* columns from summary.json's "target" (lowbw.metrics.target): the first crossing (an
    upper bound, at an evaluation) and the interpolated estimate."""
    if not isinstance(target, dict):
        return {}
    first = target.get("first_crossing") or {}
    interp = target.get("interpolated") or {}
    return {"target_loss": _num(target.get("loss")), "target_reached": "yes" if target.get("reached") else "no",
            "target_step": first.get("step"), "target_tokens": _num(first.get("tokens")),
            "target_time_s": _num(first.get("time_s")), "target_wall_s": _num(first.get("wall_s")),
            "target_energy_j": _num(first.get("energy_j")), "target_time_interp_s": _num(interp.get("time_s")),
            "target_energy_interp_j": _num(interp.get("energy_j")), "best_val_loss": _num(target.get("best_val_loss"))}


def rank_by_target(rows: list[dict]) -> list[dict]:
    """Runs that had a target, best first: those that reached it by time to target on the run's clock (then
    joules), then those that did not by their best validation loss."""
    had = [r for r in rows if r.get("target_loss") is not None]
    reached = sorted((r for r in had if r["target_reached"] == "yes"),
                     key=lambda r: (r["target_time_s"], r["target_energy_j"] or 0.0))
    missed = sorted((r for r in had if r["target_reached"] != "yes"),
                    key=lambda r: math.inf if r["best_val_loss"] is None else r["best_val_loss"])
    return reached + missed


def load_run(run_dir: Path, root: Path) -> dict:
    summary = _read_json(run_dir / "summary.json") or {}
    cfg = _read_yaml(run_dir / "config.yaml") or _read_yaml(run_dir / ".hydra" / "config.yaml") or {}
    if not isinstance(cfg, dict):
        cfg = {}
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml") or []
    metrics = read_metrics(run_dir / "metrics.jsonl")
    rel = run_dir.relative_to(root).as_posix() if run_dir != root else "."
    status = summary.get("status") or "incomplete"

    def pick(key: str, cfg_key: Optional[str] = None) -> Any:
        v = summary.get(key)
        return v if v is not None or cfg_key is None else _get(cfg, cfg_key)

    bw, lat = network_figures(cfg, summary)
    fwd_spec, bwd_spec = _get(cfg, "compress.fwd"), _get(cfg, "compress.bwd")
    row: dict[str, Any] = {k: None for k in KEYS}
    row.update(
        run=rel, status=status, error=summary.get("error"),
        network=pick("net", "net.name"), bandwidth_mbps=bw, latency_ms=lat,
        codec_fwd=pick("compress_fwd", "compress.fwd.name"), codec_bwd=pick("compress_bwd", "compress.bwd.name"),
        schedule=pick("schedule", "schedule.name"),
        stages=summary.get("stages", summary.get("world_size")) or _get(cfg, "pipeline.stages"),
        replicas=summary.get("replicas") or _get(cfg, "replicas.count") or 1,
        sync=summary["sync"].get("name") if isinstance(summary.get("sync"), dict) else "none",  # none: one pipeline
        sync_bytes_per_token=_num(summary.get("sync_bytes_per_token")),
        microbatches=pick("microbatches", "pipeline.microbatches"), seed=pick("seed", "seed"),
        clock=summary.get("clock") or ("simulated" if summary.get("kind") == "simulation" else _get(cfg, "clock.name")),
        tokens_per_s=_num(summary.get("tokens_per_s")), tokens_per_s_wall=_num(summary.get("tokens_per_s_wall")),
        bytes_per_token=_num(summary.get("bytes_per_token")), bubble_fraction=_num(summary.get("bubble_fraction")),
        train_loss=_num(summary.get("train_loss")), val_loss=_num(summary.get("val_loss")),
        steps_completed=summary.get("steps_completed", len(metrics) if metrics else None),
        steps=pick("steps", "train.steps"),
        overrides=" ".join(str(o) for o in overrides) if isinstance(overrides, list) else None,
    )
    if row["train_loss"] is None and metrics:
        row["train_loss"] = _num(metrics[-1].get("loss"))
    if row["val_loss"] is None:
        vals = [_num(m.get("val_loss")) for m in metrics if m.get("val_loss") is not None]
        row["val_loss"] = vals[-1] if vals else None
    energy = summary.get("energy")
    if isinstance(energy, dict):
        tokens = _num(energy.get("tokens")) or _num(summary.get("tokens"))
        row["j_per_token"] = _num(energy.get("j_per_token"))
        for part in ("compute", "idle", "network"):
            j = _num(energy.get(f"{part}_j"))
            row[f"{part}_j_per_token"] = j / tokens if j is not None and tokens else None
        row["energy_source"] = energy.get("label")
        row["measured_j_per_token"] = _num(energy.get("measured_j_per_token"))
    row.update(_target_columns(summary.get("target")))
    timing = summary.get("timing")
    row["timing"] = timing.get("timing") if isinstance(timing, dict) else None
    planned = isinstance(timing, dict) and timing.get("durations") in PLANNED
    for direction in ("fwd", "bwd"):
        row.update(_codec_stats(summary.get("compression"), direction))
        if planned:  # codec work charged 0 s: no time to report (run folders written before it said so hold 0)
            row[f"{direction}_encode_ms"] = row[f"{direction}_decode_ms"] = None
    if isinstance(summary.get("loss_gap"), (int, float)):  # computed by the run itself (compress.baseline_run)
        row["val_loss_gap"] = float(summary["loss_gap"])
    # private: used by the gap pairing and the plots, not written to the table
    row["_codec_params"] = {d: {k: v for k, v in (s or {}).items() if k != "name"} if isinstance(s, dict) else {}
                            for d, s in (("fwd", fwd_spec), ("bwd", bwd_spec))}
    flat = _flatten(cfg)
    row["_twin_key"] = (json.dumps(sorted((k, repr(v)) for k, v in flat.items() if not k.startswith(_NOT_TRAINING)))
                        if flat else json.dumps([row["network"], row["bandwidth_mbps"], row["schedule"], row["seed"]]))
    row["_metrics"] = metrics
    row["_cfg"] = cfg
    row["_flat"] = flat
    row["_energy_total_j"] = _num(energy.get("total_j")) if isinstance(energy, dict) else None
    return row


def _codec_labels(rows: list[dict]) -> None:
    """codec = "fwd/bwd"; a codec's parameters appear in the label only when they vary within the sweep."""
    for d in ("fwd", "bwd"):
        by_name: dict[Any, list[dict]] = defaultdict(list)
        for r in rows:
            by_name[r[f"codec_{d}"]].append(r["_codec_params"][d])
        varying = {name: sorted({k for p in ps for k in p if len({repr(q.get(k)) for q in ps}) > 1})
                   for name, ps in by_name.items()}
        for r in rows:
            name, params = r[f"codec_{d}"], r["_codec_params"][d]
            keys = varying.get(name, [])
            r[f"_label_{d}"] = (f"{name}({', '.join(f'{k}={params.get(k)}' for k in keys)})" if keys and name
                                else (name if name is not None else "?"))
    for r in rows:
        r["codec"] = f"{r['_label_fwd']}/{r['_label_bwd']}"


def _loss_gaps(rows: list[dict]) -> None:
    """Loss gap = this run's loss - the loss of the run with both codecs none and otherwise the same training
    config (network, schedule, seed, model, steps, ...) in the same sweep."""
    baselines: dict[str, dict] = {}
    for r in rows:
        if r["status"] == "completed" and r["codec_fwd"] == "none" and r["codec_bwd"] == "none":
            baselines.setdefault(r["_twin_key"], r)
    for r in rows:
        base = baselines.get(r["_twin_key"])
        if base is None:
            continue
        r["baseline_run"] = base["run"]
        for k in ("train_loss", "val_loss"):
            if r[k] is not None and base[k] is not None:
                r[f"{k}_gap"] = r[k] - base[k]


def collect_runs(root: Path) -> list[dict]:
    root = Path(root)
    rows = [load_run(d, root) for d in find_run_dirs(root)]
    _codec_labels(rows)
    _loss_gaps(rows)
    return rows

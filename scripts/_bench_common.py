"""Shared pieces of scripts/bench_overhead.py and scripts/bench_clocks.py (not a benchmark itself).

Runs lowbw through its Python API (``lowbw.train.compose`` + ``lowbw.train.run``), reads a run's
metrics.jsonl and timeline.jsonl, and replays a step's measured compute durations through
``lowbw.pipeline.player.play`` with free links (the ideal step time of that step).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

COMPUTE_ACTIONS = ("forward", "backward", "backward_input", "backward_weight")


def machine_load() -> str:
    """`uptime`'s load averages and the core count: how busy the machine was when measuring."""
    try:
        la = os.getloadavg()
        return f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} (1/5/15 min) on {os.cpu_count()} cores"
    except OSError:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def stdout_to(path: Optional[Path]) -> Iterator[None]:
    """Send this process's fd 1 (and so the spawned ranks' stdout) to ``path``; None: leave it."""
    if path is None:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def load_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_lowbw(overrides: list[str], run_dir: Path, quiet: bool = True) -> tuple[dict, list[dict], list[dict], object]:
    """Run ``lowbw-train <overrides>`` into run_dir; return (summary, metrics rows, timeline events, cfg)."""
    from lowbw.train import compose, run

    cfg = compose(list(overrides) + ["progress=false", f"out_dir={run_dir}"])
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "timeline.jsonl"):  # the recorder appends: start afresh
        (run_dir / name).unlink(missing_ok=True)
    with stdout_to(run_dir / "console.log" if quiet else None):
        summary = run(cfg, run_dir)
    return summary, load_jsonl(run_dir / "metrics.jsonl"), load_jsonl(run_dir / "timeline.jsonl"), cfg


def mean_after(values: list[float], warmup: int) -> float:
    kept = values[warmup:] if len(values) > warmup else values
    return statistics.fmean(kept)


def step_ends_to_times(ends_per_rank: list[list[float]], t0: float) -> list[float]:
    """Step times as lowbw defines them: step k ends when the last rank ends it; T_k - T_{k-1}."""
    T = [max(col) for col in zip(*ends_per_rank)]
    return [b - a for a, b in zip([t0] + T[:-1], T)]


def ideal_step_times(cfg, events: list[dict], with_links: bool = False) -> dict[int, float]:
    """Per step: the step time with this step's measured F/B durations and the optimizer, links free.

    ``with_links``: charge the messages (their real payload bytes from timeline.jsonl) to the run's
    own link model (lowbw.net.link.LinkModel, fresh each step) instead: the step time the virtual
    clock would give for these compute durations.

    Replays the run's schedule through ``lowbw.pipeline.player.play`` with every compute action
    taking the duration the run measured for it (timeline.jsonl) and messages arriving the moment
    they are sent; every rank then runs its measured optimizer step. Codec encode/decode (the
    payload copy of codec ``none``) counts as communication here, so it is not in the ideal.
    """
    from lowbw.net.link import LinkModel
    from lowbw.net.topology import Topology
    from lowbw.pipeline.schedules import build_schedule
    from lowbw.pipeline.player import play

    sched = build_schedule(cfg.schedule, cfg.pipeline.stages, cfg.pipeline.microbatches)
    by_step: dict[int, dict] = {}
    for e in events:
        d = by_step.setdefault(e["step"], {"dur": {}, "opt": {}, "bytes": {}})
        if e["kind"] == "send":
            d["bytes"][e["label"]] = e["nbytes"]
        elif e["kind"] in COMPUTE_ACTIONS:
            d["dur"][(e["rank"], e["label"])] = e["end"] - e["start"]
        elif e["kind"] == "optimizer":
            d["opt"][e["rank"]] = d["opt"].get(e["rank"], 0.0) + e["end"] - e["start"]
    out = {}
    for step, d in sorted(by_step.items()):
        links = None
        if with_links:
            topo = Topology.from_config(cfg.net, cfg.pipeline.stages, seed=cfg.seed)
            links = {r: LinkModel(topo, r, seed=cfg.seed) for r in range(sched.n_ranks)}
        tl = play(sched, duration=lambda r, a, dur=d["dur"]: dur[(r, str(a))],
                  nbytes=lambda a, nb=d["bytes"]: nb.get(str(a), 0), links=links)
        end = {r: 0.0 for r in range(sched.n_ranks)}
        for ev in tl.events:
            end[ev.rank] = max(end[ev.rank], ev.end)
        out[step] = max(end[r] + d["opt"].get(r, 0.0) for r in end)
    return out


def time_breakdown(events: list[dict], n_ranks: int, steps: list[int]) -> dict[int, dict[str, float]]:
    """Per rank, mean seconds per step of: F/B compute, optimizer, codec, receive waits, and the rest.

    "rest" = from the rank's previous step end (its optimizer end) to its optimizer end of this
    step, minus everything recorded: Python/bookkeeping time between actions, including rank 0's
    per-step metrics logging and the rank-to-rank-0 report.
    """
    keep = set(steps)
    acc = {r: {"compute": 0.0, "optimizer": 0.0, "codec": 0.0, "recv_wait": 0.0, "span": 0.0} for r in range(n_ranks)}
    opt_end: dict[tuple[int, int], float] = {}
    for e in events:
        if e["kind"] == "optimizer":
            opt_end[(e["rank"], e["step"])] = e["end"]
    for e in events:
        if e["step"] not in keep:
            continue
        a = acc[e["rank"]]
        dt = e["end"] - e["start"]
        if e["kind"] in COMPUTE_ACTIONS:
            a["compute"] += dt
        elif e["kind"] == "optimizer":
            a["optimizer"] += dt
        elif e["kind"] in ("encode", "decode"):
            a["codec"] += dt
        elif e["kind"] == "recv_wait":
            a["recv_wait"] += dt
    for r in range(n_ranks):
        for s in steps:
            if (r, s) in opt_end and (r, s - 1) in opt_end:
                acc[r]["span"] += opt_end[(r, s)] - opt_end[(r, s - 1)]
        n = max(1, len([s for s in steps if (r, s - 1) in opt_end]))
        for k in acc[r]:
            acc[r][k] /= n
        acc[r]["rest"] = acc[r]["span"] - sum(acc[r][k] for k in ("compute", "optimizer", "codec", "recv_wait"))
    return acc

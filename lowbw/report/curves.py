"""A run's loss as it trained, against its step, its clock and its joules, from metrics.jsonl.

Each line of metrics.jsonl is one optimizer step: ``step_time_s`` on the run's clock (evaluation excluded),
``busy_s`` per rank, ``bytes_per_link``, the training ``loss`` and, at evaluation steps, ``val_loss``.
Time at a step is the sum of the step times up to and including it. Joules at a step are the run's own
energy model (its config's ``hardware`` and ``energy`` nodes, :func:`lowbw.energy.account`) applied to each
step's busy seconds, span and link bytes, summed: the model is linear in those, so the last point equals the
run's modelled ``total_j`` in summary.json. Without a config to model with (a run folder holding only
metrics and a summary), the run's total is spread over its steps in proportion to their time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from lowbw.energy import account


@dataclass
class Curve:
    """One run's loss over its training; ``kind`` says whether the losses are validation or training."""

    kind: str  # "validation" | "training"
    step: list[int]
    time_s: list[float]  # on the run's clock
    joules: Optional[list[float]]  # modelled; None when the run recorded no energy
    loss: list[float]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _step_joules(metrics: list[dict], cfg: dict) -> Optional[list[float]]:
    """Modelled joules of each step, from the run's own hardware and energy config; None if not modellable."""
    hardware, energy = cfg.get("hardware"), cfg.get("energy")
    if not isinstance(hardware, dict) or not isinstance(energy, dict):
        return None
    out = []
    for m in metrics:
        busy, span = m.get("busy_s"), m.get("step_time_s")
        if not isinstance(busy, list) or not busy or not _finite(span):
            return None
        links = {tuple(int(x) for x in k.split("->")): int(n) for k, n in (m.get("bytes_per_link") or {}).items()}
        rep = account([min(float(b), span) for b in busy], span, hardware, energy, tokens=int(m.get("tokens") or 0),
                      link_bytes=links)
        out.append(rep.total_j)
    return out


def _proportional_joules(metrics: list[dict], total_j: Optional[float]) -> Optional[list[float]]:
    times = [m.get("step_time_s") for m in metrics]
    if not _finite(total_j) or not all(_finite(t) for t in times) or sum(times) <= 0:
        return None
    return [total_j * t / sum(times) for t in times]


def run_curve(row: dict) -> Optional[Curve]:
    """The loss curve of one report row (its ``_metrics``, ``_cfg`` and ``_energy_total_j``); None without a loss."""
    metrics = [m for m in row.get("_metrics") or [] if isinstance(m.get("step"), int) and _finite(m.get("step_time_s"))]
    if not metrics:
        return None
    kind = "validation" if any(_finite(m.get("val_loss")) for m in metrics) else "training"
    key = "val_loss" if kind == "validation" else "loss"
    per_step_j = None
    if row.get("_energy_total_j") is not None:
        try:
            per_step_j = _step_joules(metrics, row.get("_cfg") or {})
        except (ValueError, TypeError, KeyError):  # an energy node this version cannot read: fall back
            per_step_j = None
        if per_step_j is None:
            per_step_j = _proportional_joules(metrics, row["_energy_total_j"])
    c = Curve(kind, [], [], [] if per_step_j is not None else None, [])
    t = j = 0.0
    for i, m in enumerate(metrics):
        t += m["step_time_s"]
        if per_step_j is not None:
            j += per_step_j[i]
        if _finite(m.get(key)):
            c.step.append(m["step"])
            c.time_s.append(t)
            c.loss.append(float(m[key]))
            if c.joules is not None:
                c.joules.append(j)
    return c if c.loss else None

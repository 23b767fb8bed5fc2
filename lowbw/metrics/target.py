"""Time and energy to a target loss: what it cost a run to reach a given validation loss.

Every step's line of ``metrics.jsonl`` carries what the run has spent from its start to the end of that
step (:class:`Elapsed`): ``elapsed_s`` on the run's clock, ``elapsed_wall_s`` of wall time (evaluation
left out, as ``step_time_wall_s``) and ``elapsed_j``, modelled joules (compute + idle + network, by the
run's hardware profiles and network energy model). Unlike the summary's throughput and energy, these
include the warm-up steps: the time to a loss is the time from the start.

:func:`time_to_target` reads those lines. Validation loss is known only at evaluations (every
``train.eval_interval`` steps and at the last step), so two readings are given:

- **first crossing**: the first evaluation at which validation loss is at or below the target. The
  run had reached the target by then: step, tokens, time and joules are those at the end of that
  step -- an upper bound, exact to the evaluation cadence. Runs are ranked by it.
- **interpolated**: between the evaluation before the crossing (loss above the target) and the
  crossing, each quantity is interpolated linearly with the fraction of the loss drop at which the
  target lies, ``f = (l_before - target) / (l_before - l_crossing)``: an estimate, assuming the loss
  falls linearly between the two evaluations. None when the crossing is the first evaluation (no
  reading before it).

A run that never reaches the target records "not reached" with its best validation loss and step.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

#: the quantities a point on the way to the target has, all counted from the run's start
QUANTITIES = ("step", "tokens", "time_s", "wall_s", "energy_j")


class Elapsed:
    """Running totals of a run from its start: run-clock seconds, wall seconds and modelled joules.

    ``energy_j(busy_s, span_s, link_bytes)`` prices the cumulative busy seconds per rank, span and bytes
    per link (the run's hardware profiles and network model, lowbw.energy.account); None = no energy."""

    def __init__(self, world: int, energy_j: Optional[Callable[[list[float], float, dict], float]]):
        self.world, self._price = world, energy_j
        self.busy = [0.0] * world
        self.wall_s = 0.0
        self.links: dict[str, int] = {}

    def add(self, row: dict, t_end: float) -> dict:
        """Add one step's metrics row, which ended at ``t_end`` on the run clock; return its ``elapsed_*`` fields."""
        self.wall_s += row["step_time_wall_s"]
        for r, b in enumerate(row["busy_s"]):
            self.busy[r] += b
        for k, n in row["bytes_per_link"].items():
            self.links[k] = self.links.get(k, 0) + n
        out = {"elapsed_s": t_end, "elapsed_wall_s": self.wall_s}
        if self._price is not None:
            span = t_end
            out["elapsed_j"] = self._price([min(b, span) for b in self.busy], span, self.links)
        return out

    def replay(self, rows: list[dict]) -> None:
        """Rebuild the totals from the rows a resumed run keeps."""
        self.busy, self.wall_s, self.links = [0.0] * self.world, 0.0, {}
        for row in rows:
            self.add(row, row["elapsed_s"])


def _point(rows: list[dict], i: int, tokens: float) -> dict:
    r = rows[i]
    return {"step": r["step"], "tokens": tokens, "time_s": r.get("elapsed_s"), "wall_s": r.get("elapsed_wall_s"),
            "energy_j": r.get("elapsed_j"), "val_loss": r["val_loss"]}


def _between(a: dict, b: dict, f: float) -> dict:
    out = {}
    for k in QUANTITIES:
        out[k] = None if a[k] is None or b[k] is None else a[k] + f * (b[k] - a[k])
    return out


def time_to_target(rows: list[dict], target: float) -> dict[str, Any]:
    """When validation loss first reached ``target`` in a run's metrics rows (in step order).

    Returns ``{"loss", "reached", "first_crossing", "interpolated", "best_val_loss", "best_step",
    "evaluations"}``; a crossing point has step, tokens, time_s (run clock), wall_s, energy_j (modelled)
    and, for the first crossing, the val_loss read there."""
    tokens = 0.0
    evals: list[tuple[int, dict]] = []
    for i, r in enumerate(rows):
        tokens += r.get("tokens", 0)
        if r.get("val_loss") is not None:
            evals.append((i, _point(rows, i, tokens)))
    out: dict[str, Any] = {"loss": target, "reached": False, "first_crossing": None, "interpolated": None,
                           "best_val_loss": None, "best_step": None, "evaluations": len(evals)}
    if not evals:
        return out
    best = min(evals, key=lambda e: e[1]["val_loss"])[1]
    out["best_val_loss"], out["best_step"] = best["val_loss"], best["step"]
    for j, (_, p) in enumerate(evals):
        if p["val_loss"] <= target:
            out["reached"], out["first_crossing"] = True, p
            if j > 0:
                before = evals[j - 1][1]  # above the target, or the crossing would have been there
                f = (before["val_loss"] - target) / (before["val_loss"] - p["val_loss"])
                out["interpolated"] = _between(before, p, f)
            break
    return out

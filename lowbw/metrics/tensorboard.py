"""A run's TensorBoard log: one tag per quantity, a readable run name, and the HParams tab filled.

Layout: ``<run folder>/tb/<run name>/events...``. The run name is what the run changed from the
defaults (Hydra's override string, e.g. ``net=home,schedule=gpipe``), so ``tensorboard --logdir
outputs`` lists runs and sweeps side by side by what they varied, not by timestamp.

Tags name the quantity only: ``perf/tokens_per_s`` and ``perf/step_time_s`` are on the run's own
clock whichever clock that is (virtual or wall), so runs of both clocks share one chart; the clock
is an hparam. ``perf/step_time_wall_s`` is always the wall time the step took on this machine.

At the end the run's settings (every leaf of its config) and final metrics (``final/...``) are
written as HParams summaries into the same event file as the curves, so the HParams tab compares a
sweep's runs and links each row to its charts.
"""

from __future__ import annotations

import hashlib
import re
import threading
from pathlib import Path
from typing import Any, Optional

#: final metrics shown in the HParams tab: tag -> summary.json key (None values are left out)
FINAL_METRICS = {
    "final/tokens_per_s": "tokens_per_s",
    "final/step_time_s": "step_time_s",
    "final/bytes_per_token": "bytes_per_token",
    "final/bubble_fraction": "bubble_fraction",
    "final/train_loss": "train_loss",
    "final/val_loss": "val_loss",
}

#: settings that do not change what a run computes: not hparams
_NOT_SETTINGS = ("out_dir", "progress", "resume")

#: a folder name must stay well under the usual 255-byte limit
_MAX_NAME = 200


def run_name(overrides: str) -> str:
    """A folder name for TensorBoard from an override string (``"a=1,b/c=x"``); ``"defaults"`` if empty."""
    name = re.sub(r"[^A-Za-z0-9=,._+\-]", ".", overrides.strip()) or "defaults"
    if len(name) > _MAX_NAME:  # keep it unique: a prefix and a digest of the whole
        name = name[:_MAX_NAME - 9] + "~" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


def hparams_of(config: dict) -> dict[str, Any]:
    """Every leaf of a resolved config as a flat ``a.b.c -> value`` dict TensorBoard accepts
    (numbers, strings, booleans; lists and None as text)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if prefix or k not in _NOT_SETTINGS:
                    walk(f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}", v)
            return
        key = prefix
        if isinstance(node, (bool, int, float, str)):
            out[key] = node
        else:
            out[key] = str(node)

    walk("", config)
    return out


def final_metrics(summary: dict) -> dict[str, float]:
    """The HParams tab's metric columns from a summary.json (absent values left out)."""
    out = {tag: float(summary[key]) for tag, key in FINAL_METRICS.items() if summary.get(key) is not None}
    energy = summary.get("energy") or {}
    if energy.get("j_per_token") is not None:
        out["final/j_per_token"] = float(energy["j_per_token"])
    target = summary.get("target") or {}
    if target.get("best_val_loss") is not None:
        out["final/best_val_loss"] = float(target["best_val_loss"])
    crossing = target.get("interpolated") or target.get("first_crossing")
    for key in ("time_s", "energy_j", "tokens") if crossing else ():
        if crossing.get(key) is not None:  # to the target loss: on the run's clock, modelled joules, tokens
            out[f"final/target_{key}"] = float(crossing[key])
    return out


def _quiet_writer_thread_errors() -> None:
    """Keep TensorBoard's writer thread from printing a traceback for a write that failed (a full disk).

    That thread keeps the error for the writer's caller -- the next ``add_scalar``, ``flush`` or ``close``
    raises it, and lowbw turns it into the run's one-sentence failure -- and then re-raises it, which
    Python's ``threading.excepthook`` prints as "Exception in thread Thread-N: Traceback ...". Only an
    exception a tensorboard thread has kept (its ``exception`` attribute) is quieted; every other thread's
    still reaches the hook that was there before. Installed once per process."""
    if getattr(threading.excepthook, "lowbw_quiets_tensorboard", False):
        return
    previous = threading.excepthook

    def hook(args: "threading.ExceptHookArgs") -> None:
        thread = args.thread
        kept = thread is not None and getattr(thread, "exception", None) is args.exc_value
        if not (kept and type(thread).__module__.startswith("tensorboard.")):
            previous(args)

    hook.lowbw_quiets_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class TensorBoardLog:
    """Rank 0's TensorBoard writer for one run (see the module docstring for layout and tags)."""

    def __init__(self, tb_dir: Path, name: str, hparams: dict[str, Any]):
        # Imported here: only rank 0 writes, and the import costs every process ~2 s of start-up.
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = tb_dir / name
        self.hparams = hparams
        # A step logs 30-40 scalars; with SummaryWriter's default queue of 10 the collector thread waited for
        # TensorBoard's writer thread on most of them (measured: 2.8 -> 2.1 ms of rank 0's time a step).
        self._w = SummaryWriter(str(self.logdir), max_queue=1000)
        _quiet_writer_thread_errors()

    def scalars(self, step: int, values: dict[str, Optional[float]]) -> None:
        for tag, v in values.items():
            if v is not None:
                self._w.add_scalar(tag, v, step)

    def finish(self, step: int, summary: dict) -> None:
        """Final metrics as scalars and the HParams summaries that point at them; then close."""
        from torch.utils.tensorboard.summary import hparams  # same reason as above

        metrics = final_metrics(summary)
        hp = dict(self.hparams, status=str(summary.get("status")))
        for tag, v in metrics.items():
            self._w.add_scalar(tag, v, step)
        # Written into this run's own event file (SummaryWriter.add_hparams would open a new
        # sub-run), so the HParams tab links each row to this run's curves.
        for s in hparams(hp, metrics):
            self._w.file_writer.add_summary(s, step)
        self._w.flush()
        self._w.close()

    def close(self) -> None:
        self._w.close()

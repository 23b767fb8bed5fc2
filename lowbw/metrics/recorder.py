"""Rank 0's record of a run: metrics.jsonl, TensorBoard, the progress bar and summary.json.

Every rank sends rank 0 a small report per step (its busy time, when it finished on the run
clock, the bytes it sent, the loss if it holds the last stage). Rank 0 turns them into one line
of ``metrics.jsonl`` (written whole or not at all, at once, so a crash loses no completed step),
TensorBoard scalars, and at the end ``summary.json`` (written to a temporary file and renamed: never
half-written). Every file is complete or absent (lowbw.metrics.files); what could not be written
turns the run's status into ``failed``, with the sentence saying which file and why.

A run ends with one status: ``completed``, ``failed`` (with the error, the failed rank if known),
``interrupted`` (SIGINT/SIGTERM; the figures up to the last completed step) or ``diverged`` (a loss
or gradient that is not finite, with the step). ``last_step`` is the last step recorded.

Step time on the run clock: every rank's clock starts at 0 together, and step k ends when the last
rank finishes it, ``T_k = max_r end_r``; step time is ``T_k - T_{k-1}``. Bubble fraction is the
share of rank-seconds in that span not spent computing: ``1 - sum_r busy_r / (R * step time)``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from lowbw.energy import Measurement, account, make_network_model, profiles_for_ranks
from lowbw.metrics.files import LineLog, atomic_write_json, dumps, read_json_lines, rewrite_lines
from lowbw.metrics.gantt import write_run_pictures
from lowbw.metrics.tensorboard import TensorBoardLog
from lowbw.metrics.timeline import event_dict
from lowbw.metrics.target import Elapsed, time_to_target
from lowbw.net.topology import link_key, parse_link_key
from lowbw.timing import PLANNED

__all__ = ["Recorder", "atomic_write_json", "format_summary", "STATUSES"]

#: Every status a summary.json can hold.
STATUSES = ("completed", "failed", "interrupted", "diverged")


class Recorder:
    def __init__(self, run_dir: Path, clock: str, world: int, tokens_per_step: int, steps: int,
                 warmup_steps: int, progress: bool, meta: dict, hardware: Any = None, energy: Any = None,
                 target_loss: Optional[float] = None, hparams: Optional[dict] = None):
        """``hardware``, ``energy``: the run's config nodes, pricing each step's ``elapsed_j`` (None: not priced);
        ``target_loss``: the validation loss whose first crossing summary.json records (None: no target);
        ``hparams``: the run's settings for TensorBoard's HParams tab."""
        self.run_dir, self.clock, self.world = run_dir, clock, world
        self.target_loss = target_loss
        self.tokens_per_step, self.steps, self.warmup = tokens_per_step, steps, warmup_steps
        self.meta = meta
        # Planned durations (clock.durations=flops|fixed, a regime) charge codec work 0 s: its time is not a
        # measurement there, and is reported as None rather than as a cost of 0 (scripts/bench_codecs.py times it).
        self._codec_timed = (meta.get("timing") or {}).get("durations") not in PLANNED
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        self._metrics = LineLog(self.metrics_path)
        self._timeline = LineLog(run_dir / "timeline.jsonl")
        # log_step runs on the collector thread, finish on the main thread: once finished, nothing more
        # is appended, so summary.json and metrics.jsonl agree on the last step.
        self._lock = threading.Lock()
        self._finished = False
        self.tb_dir = run_dir / "tb"
        self._tb = TensorBoardLog(self.tb_dir, meta.get("run_name") or "run", hparams or {})
        self._bar = None
        if progress:
            self._bar = tqdm(total=steps, desc="train", unit="step", dynamic_ncols=True)
        self.rows: list[dict] = []
        self._t_prev = 0.0
        self._wall_prev = time.perf_counter()
        self._wall_start = self._wall_prev
        self.val_loss: Optional[float] = None
        self.link_bytes: dict[str, int] = {}
        self.codec_totals: dict[str, dict[str, float]] = {}
        self._energy_inputs: Optional[tuple] = None
        self._prices = None if hardware is None else (profiles_for_ranks(hardware, world), make_network_model(energy))
        self.elapsed = Elapsed(world, self._elapsed_j if hardware is not None else None)

    def _elapsed_j(self, busy: list[float], span: float, links: dict[str, int]) -> float:
        """Modelled joules of busy seconds per rank, a span and bytes per link (the run's profiles and model)."""
        profiles, model = self._prices
        return account(busy, span, profiles, model, link_bytes={parse_link_key(k): n for k, n in links.items()},
                       clock=self.clock).total_j

    def log_step(self, step: int, reports: list[dict], excluded_wall_s: float = 0.0) -> Optional[dict]:
        with self._lock:
            return None if self._finished else self._log_step(step, reports, excluded_wall_s)

    def _log_step(self, step: int, reports: list[dict], excluded_wall_s: float) -> dict:
        t_end = max(r["end"] for r in reports)
        span = t_end - self._t_prev
        self._t_prev = t_end
        now = time.perf_counter()
        wall = now - self._wall_prev - excluded_wall_s
        self._wall_prev = now
        busy = [r["busy"] for r in sorted(reports, key=lambda r: r["rank"])]
        per_link: dict[str, int] = {}
        for r in reports:
            for dst, n in r["bytes_sent"].items():
                key = link_key(r["rank"], int(dst))
                per_link[key] = per_link.get(key, 0) + n
        for k, n in per_link.items():
            self.link_bytes[k] = self.link_bytes.get(k, 0) + n
        sent = sum(per_link.values())
        sync = sum(r.get("sync_bytes", 0) for r in reports)  # replicas' synchronisation, part of sent
        loss_rep = [r for r in reports if r.get("n_loss")]
        loss = sum(r["loss_sum"] for r in loss_rep) / max(1, sum(r["n_loss"] for r in loss_rep))
        row = {
            "step": step,
            "loss": loss,
            "tokens": self.tokens_per_step,
            "clock": self.clock,
            "step_time_s": span,
            "step_time_wall_s": wall,
            "tokens_per_s": self.tokens_per_step / span if span > 0 else None,
            "bubble_fraction": 1.0 - sum(busy) / (self.world * span) if span > 0 else 0.0,
            "bytes_sent": sent,
            "bytes_per_token": sent / self.tokens_per_step,
            "sync_bytes_sent": sync,
            "bytes_per_link": per_link,
            "busy_s": busy,
            "idle_s": [max(0.0, span - b) for b in busy],
        }
        row.update(self.elapsed.add(row, t_end))
        codecs = self._codec_step(reports)
        if codecs:
            row["compression"] = codecs
        vals = [r["val_loss"] for r in reports if r.get("val_loss") is not None]
        if vals:
            row["val_loss"] = self.val_loss = vals[0]
        self._timeline.extend(dumps(event_dict(e)) for r in reports for e in r.get("events", []))
        self._metrics.append(dumps(row))  # last: a step is in metrics.jsonl only with all its events
        self.rows.append(row)
        self._tb.scalars(step, _tb_scalars(row))
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s'] or 0:.0f}", refresh=False)
        return row

    def _codec_step(self, reports: list[dict]) -> dict:
        """Merge the sender's and receiver's view of each boundary/direction for one step."""
        step: dict[str, dict[str, float]] = {}
        for r in reports:
            for key, c in r.get("codecs", {}).items():
                acc = step.setdefault(key, {})
                for k, v in c.items():
                    acc[k] = acc.get(k, 0) + v
        for key, c in step.items():
            tot = self.codec_totals.setdefault(key, {})
            for k, v in c.items():
                tot[k] = tot.get(k, 0) + v
        return {key: _codec_view(c, self._codec_timed) for key, c in step.items()}

    def state_dict(self) -> dict:
        """Running totals a resumed run continues from (rows are re-read from metrics.jsonl)."""
        return {"t_prev": self._t_prev, "link_bytes": dict(self.link_bytes),
                "codec_totals": {k: dict(v) for k, v in self.codec_totals.items()}, "val_loss": self.val_loss,
                "n_rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        """Continue a run: keep the first n_rows steps of metrics.jsonl and timeline.jsonl, drop the rest."""
        n = state["n_rows"]
        self._metrics.close()
        self._timeline.close()
        self.rows = read_json_lines(self.metrics_path)[:n]
        last_step = self.rows[-1]["step"] if self.rows else -1
        rewrite_lines(self.metrics_path, [dumps(r) for r in self.rows])
        tl = self.run_dir / "timeline.jsonl"
        rewrite_lines(tl, [dumps(e) for e in read_json_lines(tl) if e.get("step", last_step + 1) <= last_step])
        self._metrics = LineLog(self.metrics_path)
        self._timeline = LineLog(tl)
        self._t_prev = state["t_prev"]
        self.link_bytes = dict(state["link_bytes"])
        self.codec_totals = {k: dict(v) for k, v in state["codec_totals"].items()}
        self.val_loss = state["val_loss"]
        self.elapsed.replay(self.rows)
        if self._bar is not None:
            self._bar.update(n)

    @property
    def clock_end_s(self) -> float:
        """When the last recorded step ended, on the run clock (s)."""
        return self._t_prev

    def set_energy_inputs(self, hardware: Any, energy: Any, measured: list) -> None:
        """Profiles, network model and each rank's measured window (or None), for the energy report."""
        self._energy_inputs = (hardware, energy, measured)

    def measured_rows(self) -> list[dict]:
        """The steps averaged into throughput and energy: all but the first ``warmup_steps`` (start-up
        effects), unless there are no more steps than that. lowbw-simulate uses the same window."""
        return self.rows[self.warmup:] if len(self.rows) > self.warmup else self.rows

    def energy(self) -> Optional[dict]:
        """Energy over the measured steps (evaluation excluded), J/token over their tokens."""
        if self._energy_inputs is None or not self.rows:
            return None
        hardware, energy, measured = self._energy_inputs
        meas = [None if m is None else Measurement(m["joules"], m["seconds"], m["meter"], m["scope"]) for m in measured]
        rows = self.measured_rows()
        span = sum(r["step_time_s"] for r in rows)  # run clock
        busy = [sum(r["busy_s"][rank] for r in rows) for rank in range(self.world)]
        links: dict[tuple[int, int], int] = {}
        for r in rows:
            for k, n in r["bytes_per_link"].items():
                links[parse_link_key(k)] = links.get(parse_link_key(k), 0) + n
        report = account([min(b, span) for b in busy], span, hardware, energy,
                         tokens=self.tokens_per_step * len(rows), link_bytes=links, measured=meas, clock=self.clock)
        self._tb.scalars(len(self.rows) - 1, report.scalars())
        return report.to_dict()

    def _loss_gap(self) -> Optional[float]:
        """Validation loss minus that of the baseline run named by compress.baseline_run."""
        base = self.meta.get("baseline_run")
        if not base or self.val_loss is None:
            return None
        try:  # checked before the run (lowbw.validation); read again here, so never trusted blindly
            ref = json.loads((Path(base) / "summary.json").read_text())
        except (OSError, ValueError):
            return None
        ref = ref.get("val_loss") if isinstance(ref, dict) else None
        return self.val_loss - ref if isinstance(ref, (int, float)) and not isinstance(ref, bool) else None

    def summary(self, status: str, error: Optional[str] = None) -> dict:
        rows = self.rows
        measured = self.measured_rows()
        t = sum(r["step_time_s"] for r in measured)
        tw = sum(r["step_time_wall_s"] for r in measured)
        tokens = self.tokens_per_step * len(rows)
        sent = sum(r["bytes_sent"] for r in rows)
        sync = sum(r.get("sync_bytes_sent", 0) for r in rows)
        return {
            "status": status,
            "error": error,
            "clock": self.clock,
            "steps_completed": len(rows),
            "last_step": rows[-1]["step"] if rows else None,
            "steps": self.steps,
            "tokens": tokens,
            "tokens_per_s": self.tokens_per_step * len(measured) / t if t > 0 else None,
            "tokens_per_s_wall": self.tokens_per_step * len(measured) / tw if tw > 0 else None,
            "step_time_s": t / len(measured) if measured else None,
            "step_time_wall_s": tw / len(measured) if measured else None,
            "measured_steps": len(measured),
            "bubble_fraction": sum(r["bubble_fraction"] for r in measured) / len(measured) if measured else None,
            "bytes_sent": sent,
            "bytes_per_token": sent / tokens if tokens else None,
            # of which the replicas' synchronisation (lowbw.replicas); the rest is the pipeline's
            "sync_bytes_sent": sync,
            "sync_bytes_per_token": sync / tokens if tokens else None,
            "bytes_per_link": self.link_bytes,
            "train_loss": rows[-1]["loss"] if rows else None,
            "val_loss": self.val_loss,
            "compression": {k: _codec_view(c, self._codec_timed) for k, c in self.codec_totals.items()},
            "loss_gap": self._loss_gap(),
            "target": None if self.target_loss is None else time_to_target(rows, self.target_loss),
            "energy": self.energy(),
            "run_wall_s": time.perf_counter() - self._wall_start,
            "run_dir": str(self.run_dir),
            "metrics": str(self.metrics_path),
            "tensorboard": str(self.tb_dir),
            **self.meta,
        }

    def finish(self, status: str, error: Optional[str] = None, pictures: bool = True, **extra: Any) -> dict:
        """Close the files and write summary.json with ``status`` (one of STATUSES) and ``extra`` fields
        (e.g. ``failed_rank``, ``diverged_step``). A file that cannot be written makes the status
        ``failed`` with a sentence naming it; summary.json itself failing raises OutputError.
        ``pictures=False``: no timeline.png / trace.json (a run asked to stop, stops at once; draw them
        later with ``python -m lowbw.metrics.gantt RUN_DIR``)."""
        assert status in STATUSES, status
        with self._lock:
            self._finished = True
        for f in (self._metrics, self._timeline):
            f.close()
        if self._bar is not None:
            self._bar.close()
        summary = {**self.summary(status, error), **extra}  # before TensorBoard closes: energy scalars
        path = self.run_dir / "summary.json"
        if status != "completed":  # the record of what happened first, the pictures after
            atomic_write_json(path, summary)
        problems = self._post_process(pictures, summary)
        if problems:
            summary["error"] = "; ".join(([error] if error else []) + problems)
            summary["status"] = "failed" if status == "completed" else status
        if problems or status == "completed":
            atomic_write_json(path, summary)
        return summary

    def _post_process(self, pictures: bool, summary: dict) -> list[str]:
        problems = []
        try:  # the final metrics and the run's settings for the HParams tab, then close
            self._tb.finish(max(0, len(self.rows) - 1), summary)
        except Exception as e:  # noqa: BLE001 -- tensorboard's writer thread re-raises what it met
            problems.append(f"could not write {self.tb_dir}: {type(e).__name__}: {e}")
        if not pictures:
            return problems
        return problems + write_run_pictures(self.run_dir, self.clock, self.world, self.warmup, self.meta)


def _tb_scalars(row: dict) -> dict[str, Optional[float]]:
    """One step's TensorBoard scalars: one tag per quantity, on the run's clock unless named wall."""
    out = {
        "train/loss": row["loss"],
        "val/loss": row.get("val_loss"),
        "perf/step_time_s": row["step_time_s"],
        "perf/step_time_wall_s": row["step_time_wall_s"],
        "perf/tokens_per_s": row["tokens_per_s"],
        "perf/bubble_fraction": row["bubble_fraction"],
        "net/bytes_per_token": row["bytes_per_token"],
    }
    for key, c in row.get("compression", {}).items():
        for name in ("ratio", "rel_error", "encode_s", "decode_s"):
            out[f"compress/{key}/{name}"] = c.get(name)
    for rank, (b, i) in enumerate(zip(row["busy_s"], row["idle_s"])):
        out[f"rank{rank}/busy_s"], out[f"rank{rank}/idle_s"] = b, i
    return out


def _codec_view(c: dict, timed: bool) -> dict:
    """A boundary's codec statistics as recorded: ``encode_s``/``decode_s`` per message, None when not
    ``timed`` (the clock charged codec work 0 s)."""
    n = max(1, c.get("messages", 0))
    if not c.get("measured"):
        rel_error = None
    elif c.get("norm_sq"):
        rel_error = (c["err_sq"] / c["norm_sq"]) ** 0.5
    else:  # lossless (nothing summed: the executor does not measure what is exact) or all-zero tensors
        rel_error = 0.0 if not c.get("err_sq") else None
    return {
        "messages": int(c.get("messages", 0)),
        "ratio": c["raw_bytes"] / c["wire_bytes"] if c.get("wire_bytes") else None,
        "rel_error": rel_error,
        "encode_s": c.get("encode_s", 0.0) / n if timed else None,
        "decode_s": c.get("decode_s", 0.0) / n if timed else None,
    }


def _j(joules: float) -> str:
    return f"{joules:,.0f} J" if abs(joules) >= 1000 else f"{joules:.4g} J"


def format_target(t: dict, clock: str) -> str:
    """One console line: when validation loss first reached the target, or the best it reached."""
    if not t["reached"]:
        return (f"  target       validation loss {t['loss']:g} not reached in {t['evaluations']} evaluations; "
                f"best {t['best_val_loss']:.4f} at step {t['best_step']}")
    p = t["first_crossing"]
    energy = "" if p["energy_j"] is None else f", {_j(p['energy_j'])} (modelled)"
    return (f"  target       validation loss {t['loss']:g} reached at step {p['step']} ({p['tokens']:,.0f} tokens): "
            f"{p['time_s']:,.4g} s ({clock} clock), {p['wall_s']:,.4g} s wall{energy}")


def _shape(s: dict) -> str:
    """"4 stages", or with replicas "2 stages x 2 replicas (allreduce)"."""
    replicas = s.get("replicas") or 1
    if replicas == 1:
        return f"{s.get('world_size', '?')} stages"
    return f"{s.get('stages', '?')} stages x {replicas} replicas ({(s.get('sync') or {}).get('name', '?')})"


def format_summary(s: dict) -> str:
    """The console summary a user reads at the end of a run."""
    def num(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    c = s["clock"]
    lines = [
        f"lowbw run {s['status']}: {s['steps_completed']}/{s['steps']} steps, {s['tokens']} tokens, "
        f"{_shape(s)}, schedule {s.get('schedule', '?')}, net {s.get('net', '?')}",
        f"  throughput   {num(s['tokens_per_s'], ',.1f')} tokens/s ({c} clock)"
        + (f"   [the emulation itself ran at {num(s['tokens_per_s_wall'], ',.1f')} tokens/s of wall time]"
           if c == "virtual" else ""),
        f"  step time    {num(s['step_time_s'], '.4f')} s ({c} clock)   bubble fraction {num(s['bubble_fraction'], '.3f')}",
        f"  traffic      {num(s['bytes_per_token'], ',.1f')} bytes sent per token   ({s['bytes_sent']:,} bytes in all)"
        + (f", of which {num(s.get('sync_bytes_per_token'), ',.1f')} between replicas" if (s.get("replicas") or 1) > 1
           else ""),
        f"  loss         train {num(s['train_loss'], '.4f')}   validation {num(s['val_loss'], '.4f')}",
        f"  outputs      {s['run_dir']}  (summary.json, metrics.jsonl, timeline.png, trace.json, tb/)",
    ]
    t = s.get("timing")
    if t:
        lines[1:1] = [f"  timing       {t['timing']}", f"  learning     {t['learning']}"]
    if s.get("target"):
        lines.insert(-1, format_target(s["target"], c))
    compressed = (s.get("compress_fwd"), s.get("compress_bwd")) != ("none", "none")
    for key, c in sorted((s.get("compression") or {}).items()) if compressed else []:
        rel = "n/a" if c["rel_error"] is None else f"{c['rel_error']:.2e}"
        times = ("codec time not charged (planned durations charge it 0 s)" if c.get("encode_s") is None else
                 f"encode {1e3 * c['encode_s']:.2f} ms, decode {1e3 * c['decode_s']:.2f} ms per message")
        lines.append(f"  boundary {key:<7} ratio {num(c['ratio'], '.2f')}x, rel. error {rel}, {times}")
    if s.get("loss_gap") is not None:
        lines.append(f"  loss gap     {s['loss_gap']:+.4f} validation loss vs baseline {s.get('baseline_run')}")
    e = s.get("energy")
    if e:
        lines.append(f"  energy       {num(e['j_per_token'], '.4g')} J/token ({e['label']}): compute {_j(e['compute_j'])}, "
                     f"idle {_j(e['idle_j'])}, network {_j(e['network_j'])}")
    if s.get("error"):
        lines.append(f"  error        {s['error']}")
    return "\n".join(lines)

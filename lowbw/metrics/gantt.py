"""Pictures of a timeline: a PNG Gantt chart and a Chrome-trace JSON (opens in Perfetto / chrome://tracing).

    python -m lowbw.metrics.gantt RUN_DIR [--steps 2] [--first 1] [--ranks 32]   # timeline.png + trace.json

One row per rank. Forward, backward, input-gradient (I), weight-gradient (W), codec work and the
optimizer are coloured bars; a receive's wait is a hatched bar; a send (handing a message to the
link, instantaneous on the rank) is a tick; idle time is the light background left uncovered.
Every finished run leaves both files in its folder (rank 0 draws them in ``Recorder.finish``):
the PNG shows the first few steps after warm-up, the trace every step. The PNG draws at most
:data:`MAX_RANKS_DRAWN` ranks (the first ones) and says so in its title; the trace has every rank.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Iterable, Optional

from lowbw.metrics.files import atomic_write_bytes, atomic_write_text
from lowbw.metrics.timeline import Event, Timeline

#: Colour of each event kind in both pictures (Perfetto takes "cname" only from a fixed palette, so
#: the trace uses categories instead).
COLORS = {
    "forward": "#4C72B0",
    "backward": "#DD8452",
    "backward_input": "#C44E52",
    "backward_weight": "#55A868",
    "encode": "#8172B3",
    "decode": "#937860",
    "optimizer": "#DA8BC3",
    "recv_wait": "#CCB974",
    "sync": "#64B5CD",
    "sync_wait": "#A6D8E6",
    "send": "#222222",
    "idle": "#EEEEEE",
}
LABELS = {
    "forward": "forward (F)",
    "backward": "backward (B = I + W)",
    "backward_input": "input gradient (I)",
    "backward_weight": "weight gradient (W)",
    "encode": "encode",
    "decode": "decode",
    "optimizer": "optimizer",
    "recv_wait": "receive wait",
    "sync": "replica sync (sums, codecs)",
    "sync_wait": "replica sync wait",
    "send": "send",
    "idle": "idle",
}


#: Ranks a Gantt PNG draws by default: at 0.55 inch a row, 32 rows make an 18-inch-tall chart, the most
#: that still reads on a screen; the Chrome trace holds every rank.
MAX_RANKS_DRAWN = 32


def load_timeline(path: str | Path, clock: str = "virtual", n_ranks: Optional[int] = None) -> Timeline:
    """Read a ``timeline.jsonl`` (one Event per line, all ranks, all steps)."""
    events = [Event(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]
    n = n_ranks if n_ranks is not None else 1 + max((e.rank for e in events), default=-1)
    return Timeline(clock, n, events)


def select_steps(tl: Timeline, first: int = 0, count: Optional[int] = None) -> Timeline:
    """The events of steps first .. first+count-1 (all from ``first`` when count is None)."""
    steps = sorted({e.step for e in tl.events})
    if steps and first > steps[-1]:  # fewer steps than asked: show the last ones
        first = steps[max(0, len(steps) - (count or 1))]
    keep = [e for e in tl.events if e.step >= first and (count is None or e.step < first + count)]
    return Timeline(tl.clock, tl.n_ranks, keep)


def select_ranks(tl: Timeline, count: int) -> Timeline:
    """The events of ranks 0 .. count-1 (a timeline of that many ranks)."""
    n = max(0, min(count, tl.n_ranks))
    return Timeline(tl.clock, n, [e for e in tl.events if e.rank < n])


def ranks_note(n_drawn: int, n_ranks: int) -> str:
    """What a picture cut to its first ranks says about it ("" when it shows them all)."""
    return "" if n_drawn >= n_ranks else f"ranks 0-{n_drawn - 1} of {n_ranks}"


def plot_gantt(tl: Timeline, path: str | Path, title: str = "", width: float = 14.0,
               of_ranks: Optional[int] = None) -> Path:
    """Draw ``tl`` as a Gantt chart, one row per rank; return the PNG's path. ``of_ranks``: how many ranks the
    run had, when ``tl`` holds only the first of them (see :func:`select_ranks`); the title says so."""
    # matplotlib is imported here, not at the top: every rank imports this module through the
    # recorder, only rank 0 draws, once, at the end (the import costs ~1 s of start-up per process).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    events = tl.events
    if not events:
        raise ValueError("the timeline has no events to draw")
    t0 = min(e.start for e in events)
    t1 = max(e.end for e in events)
    span = max(t1 - t0, 1e-12)
    R = tl.n_ranks
    fig, ax = plt.subplots(figsize=(width, 0.9 + 0.55 * R))
    used = {"idle"}
    for r in range(R):
        y = R - 1 - r
        ax.broken_barh([(t0, span)], (y - 0.4, 0.8), facecolors=COLORS["idle"], edgecolor="none")
        mine = [e for e in events if e.rank == r]
        for kind in ("recv_wait", "sync_wait", "forward", "backward", "backward_input", "backward_weight", "encode",
                     "decode", "optimizer", "sync"):
            bars = [(e.start, e.duration) for e in mine if e.kind == kind and e.duration > 0]
            if not bars:
                continue
            used.add(kind)
            hatch = "////" if kind in ("recv_wait", "sync_wait") else None
            ax.broken_barh(bars, (y - 0.4, 0.8), facecolors=COLORS[kind], edgecolor="white" if hatch is None else
                           "#8a7a3a", linewidth=0.3, hatch=hatch)
        sends = [e.start for e in mine if e.kind == "send"]
        if sends:
            used.add("send")
            ax.vlines(sends, y + 0.4, y + 0.5, colors=COLORS["send"], linewidth=0.8)
        # action labels where they fit (e.g. "F3", "W1"): a bar wider than ~1/60 of the window
        for e in mine:
            if e.kind in ("forward", "backward", "backward_input", "backward_weight") and e.duration > span / 60:
                short = e.label
                for k in ("F", "B", "I", "W"):
                    if k in short:
                        short = k + short.split(k, 1)[1]
                        break
                ax.text(e.start + e.duration / 2, y, short, ha="center", va="center", fontsize=6, color="white",
                        clip_on=True)
    ax.set_yticks(range(R))
    ax.set_yticklabels([f"rank {r}" for r in reversed(range(R))])
    ax.set_ylim(-0.6, R - 0.4 + 0.15)
    ax.set_xlim(t0, t1)
    ax.set_xlabel(f"time (s, {tl.clock} clock)")
    steps = sorted({e.step for e in events})
    step_txt = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
    cut = ranks_note(R, of_ranks) if of_ranks else ""
    step_txt += f", {cut}" if cut else ""
    ax.set_title(f"{title}  ({step_txt})" if title else step_txt, fontsize=10)
    order = [k for k in COLORS if k in used]
    waits = ("recv_wait", "sync_wait")
    handles = [Patch(facecolor=COLORS[k], hatch="////" if k in waits else None,
                     edgecolor="#8a7a3a" if k in waits else "none", label=LABELS[k]) for k in order]
    ncol = min(len(handles), 5)
    legend_h = 0.25 * -(-len(handles) // ncol) + 0.1  # inches
    fig.set_figheight(fig.get_figheight() + legend_h)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_h / fig.get_figheight(), 1, 1))
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=130, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())  # complete or absent
    return path


def chrome_trace(tl: Timeline, path: Optional[str | Path] = None, title: str = "") -> dict:
    """Chrome trace events (``{"traceEvents": [...]}``, ph "X", µs): pid = rank, tid 0 compute, 1 comm.

    Open the file in https://ui.perfetto.dev or chrome://tracing.
    """
    out: list[dict] = []
    for r in range(tl.n_ranks):
        out.append({"ph": "M", "name": "process_name", "pid": r, "tid": 0, "args": {"name": f"rank {r}"}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": r, "tid": 0, "args": {"sort_index": r}})
        out.append({"ph": "M", "name": "thread_name", "pid": r, "tid": 0, "args": {"name": "compute"}})
        out.append({"ph": "M", "name": "thread_name", "pid": r, "tid": 1, "args": {"name": "communication"}})
    for e in tl.events:
        comm = e.kind in ("send", "recv_wait", "sync_wait")
        ev = {
            "name": f"{e.label}" if e.label and e.label != e.kind else e.kind,
            "cat": e.kind,
            "ph": "X",
            "ts": e.start * 1e6,
            "dur": max(e.duration, 0.0) * 1e6,
            "pid": e.rank,
            "tid": 1 if comm else 0,
            "args": {"kind": e.kind, "step": e.step},
        }
        if e.nbytes:
            ev["args"]["bytes"] = e.nbytes
        if e.peer >= 0:
            ev["args"]["peer"] = e.peer
        out.append(ev)
    trace = {"traceEvents": out, "displayTimeUnit": "ms",
             "otherData": {"clock": tl.clock, "title": title, "time_unit": f"us of the {tl.clock} clock"}}
    if path is not None:
        atomic_write_text(Path(path), json.dumps(trace))  # complete or absent
    return trace


def run_title(meta: dict, clock: str) -> str:
    ranks = f"{meta.get('world_size', '?')} ranks"
    if (meta.get("replicas") or 1) > 1:  # lowbw.replicas: rank g is replica g // stages
        ranks += f" ({meta.get('stages', '?')} stages x {meta['replicas']} replicas)"
    parts = [f"schedule {meta.get('schedule', '?')}", f"net {meta.get('net', '?')}", ranks,
             f"{meta.get('microbatches', '?')} microbatches"]
    if meta.get("compress_fwd", "none") != "none" or meta.get("compress_bwd", "none") != "none":
        parts.append(f"compress {meta.get('compress_fwd')}/{meta.get('compress_bwd')}")
    return ", ".join(parts) + f" ({clock} clock)"


def write_run_pictures(run_dir: Path, clock: str, world: int, warmup: int, meta: dict, steps: int = 2,
                       ranks: int = MAX_RANKS_DRAWN) -> list[str]:
    """timeline.png (``steps`` steps after warm-up, the first ``ranks`` ranks) and trace.json (all steps, all
    ranks) from a run's timeline.jsonl.

    Each file is written whole or not at all. Returns what could not be written, one sentence each
    (empty when both were written): the recorder turns that into a failed run, never a silent one.
    """
    src = Path(run_dir) / "timeline.jsonl"
    if not src.exists() or src.stat().st_size == 0:
        return []
    problems = []
    try:
        tl = load_timeline(src, clock, world)
    except (OSError, ValueError, TypeError) as e:
        return [f"could not read {src} to draw the timeline: {type(e).__name__}: {e}"]
    title = run_title(meta, clock)
    drawn = select_ranks(select_steps(tl, warmup, steps), ranks)
    for name, draw in (("trace.json", lambda p: chrome_trace(tl, p, title)),
                       ("timeline.png", lambda p: plot_gantt(drawn, p, title, of_ranks=tl.n_ranks))):
        try:
            draw(Path(run_dir) / name)
        except Exception as e:  # noqa: BLE001 -- reported as the run's failure by the recorder
            problems.append(str(e) if isinstance(e, OSError) else f"could not draw {name}: {type(e).__name__}: {e}")
    if ranks < tl.n_ranks:
        print(f"lowbw: timeline.png shows {ranks_note(ranks, tl.n_ranks)} (trace.json has them all)", file=sys.stderr)
    return problems


def main(argv: Optional[Iterable[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="Draw a run's timeline.jsonl as timeline.png and trace.json")
    ap.add_argument("run_dir")
    ap.add_argument("--first", type=int, default=None, help="first step drawn (default: after warm-up)")
    ap.add_argument("--steps", type=int, default=2, help="steps drawn in the PNG")
    ap.add_argument("--ranks", type=int, default=MAX_RANKS_DRAWN, help="ranks drawn in the PNG (the first ones)")
    ap.add_argument("--out", default=None, help="PNG path (default RUN_DIR/timeline.png)")
    a = ap.parse_args(list(argv) if argv is not None else None)
    run = Path(a.run_dir)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    clock = summary.get("clock", "virtual")
    tl = load_timeline(run / "timeline.jsonl", clock, summary.get("world_size"))
    first = a.first if a.first is not None else (summary.get("steps_completed", 0) - summary.get("measured_steps", 0))
    title = run_title(summary, clock)
    chrome_trace(tl, run / "trace.json", title)
    out = plot_gantt(select_ranks(select_steps(tl, first, a.steps), a.ranks), a.out or run / "timeline.png", title,
                     of_ranks=tl.n_ranks)
    cut = ranks_note(min(a.ranks, tl.n_ranks), tl.n_ranks)
    print(f"wrote {out}" + (f" ({cut})" if cut else "") + f" and {run / 'trace.json'}")


if __name__ == "__main__":
    main()

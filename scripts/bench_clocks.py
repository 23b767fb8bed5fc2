#!/usr/bin/env python
"""Wall clock against virtual clock on a slow link, and what the virtual clock costs in wall time.

    python scripts/bench_clocks.py [--steps 12] [--warmup 2] [--schedule 1f1b] [--mbps 10] [--latency-ms 50]

One 4-stage run of the tiny model (model=tiny: 4 blocks, n_embd 64, 4 heads, block 64; batch 8 =
4 microbatches), three times, through lowbw.train.run:

  A. slow link, clock=wall:      net=home net.uplink_mbps=10 net.downlink_mbps=10 net.latency_ms=50
                                 net.jitter_ms=0 -- every message really held back by the emulation;
  B. the same slow link, clock=virtual clock.durations=measured -- event time, nothing sleeps;
  C. no emulation:               net=ideal clock=wall -- the unshaped run.

Prints each run's mean step time on its own clock and on the wall (the first --warmup steps left
out), then the two ratios: B's virtual step time / A's wall step time (the clocks agree when this
is within 5% of 1), and B's wall time per step / C's wall step time (the price of WAN timing by the
virtual clock: about 1 means it costs no more than an unshaped run), and how much faster B ran
than A on the wall. Then where A and B differ: each run's own measured compute durations (and
real payload sizes) replayed through the link model step by step -- A measured vs A replayed is
what the wall clock's real-time emulation adds (sleep overshoot, thread wake-ups, real transfer
time), A replayed vs B replayed is the effect of wall-time vs thread-CPU-time compute durations.
Machine load is printed: wall-clock runs are timing-sensitive.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import ideal_step_times, machine_load, mean_after, run_lowbw  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="leading steps left out of the means")
    ap.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b"])
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--mbps", type=float, default=10.0, help="uplink and downlink of every node, Mbit/s")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="one-way latency of every link, ms")
    ap.add_argument("--model", default="tiny", help="model preset (configs/model)")
    ap.add_argument("--out", type=Path, default=None, help="keep the run folders here (default: a temp dir)")
    ap.add_argument("--verbose", action="store_true", help="show lowbw's own console output")
    args = ap.parse_args()
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")
    out = args.out or Path(tempfile.mkdtemp(prefix="lowbw-bench-clocks-"))

    base = [f"model={args.model}", f"pipeline.stages={args.stages}", "pipeline.microbatches=4", "train.batch_size=8",
            f"schedule={args.schedule}", f"train.steps={args.steps}", f"train.warmup_steps={args.warmup}",
            "train.eval_interval=0", "train.eval_batches=1", "device=cpu"]
    slow = ["net=home", f"net.uplink_mbps={args.mbps}", f"net.downlink_mbps={args.mbps}",
            f"net.latency_ms={args.latency_ms}", "net.jitter_ms=0"]
    runs = {
        "A wall, slow link": base + slow + ["clock=wall"],
        "B virtual, slow link": base + slow + ["clock=virtual", "clock.durations=measured"],
        "C wall, no emulation": base + ["net=ideal", "clock=wall"],
    }
    from lowbw.train import compose

    m = compose([f"model={args.model}"]).model
    print(f"config: {args.stages} stages, schedule {args.schedule}, model {args.model} (n_layer={m.n_layer} "
          f"n_embd={m.n_embd} n_head={m.n_head} block_size={m.block_size}), batch 8 = 4 microbatches; "
          f"slow link {args.mbps:g} Mbit/s up and down, {args.latency_ms:g} ms one way, pipelined; "
          f"{args.steps} steps, first {args.warmup} left out")
    print(f"machine before: {machine_load()}", flush=True)

    res = {}
    for i, (name, ov) in enumerate(runs.items()):
        summary, rows, events, cfg = run_lowbw(ov, out / f"run{'ABC'[i]}", quiet=not args.verbose)
        replay = ideal_step_times(cfg, events, with_links=True)
        res[name] = {
            "clock": summary["clock"],
            "step": mean_after([r["step_time_s"] for r in rows], args.warmup),
            "wall": mean_after([r["step_time_wall_s"] for r in rows], args.warmup),
            "bubble": summary["bubble_fraction"],
            "run_wall": summary["run_wall_s"],
            "replay": mean_after([replay[r["step"]] for r in rows], args.warmup),
        }
        print(f"  done {name}; {machine_load()}", flush=True)

    print()
    print(f"{'run':<24}{'clock':>8}{'step s (own clock)':>20}{'step s (wall)':>15}{'bubble':>8}{'train loop wall s':>19}")
    for name, r in res.items():
        print(f"{name:<24}{r['clock']:>8}{r['step']:>20.4f}{r['wall']:>15.4f}{r['bubble']:>8.3f}{r['run_wall']:>19.2f}")
    A, B, C = res.values()
    print()
    print(f"virtual / wall step time on the slow link (B / A):          {B['step'] / A['step']:.3f}"
          f"   ({(B['step'] / A['step'] - 1) * 100:+.1f}%; aim within 5%)")
    print(f"virtual run's wall time / unshaped run's (B wall / C wall): {B['wall'] / C['wall']:.3f}"
          f"   per step: {B['wall'] * 1e3:.1f} ms vs {C['wall'] * 1e3:.1f} ms")
    print(f"wall-clock slow run / virtual run, wall time (A / B):       {A['wall'] / B['wall']:.1f}x")
    print()
    print("where A and B differ: each run's own measured compute durations replayed through the link model")
    print("(lowbw.pipeline.player.play with lowbw.net.link.LinkModel, step by step):")
    print(f"  A replayed {A['replay']:.4f} s vs A measured {A['step']:.4f} s: the wall clock's real-time emulation adds "
          f"{(A['step'] - A['replay']) * 1e3:+.1f} ms/step ({(A['step'] / A['replay'] - 1) * 100:+.1f}%)")
    print(f"  B replayed {B['replay']:.4f} s vs B measured {B['step']:.4f} s "
          f"({(B['step'] / B['replay'] - 1) * 100:+.1f}%)")
    print(f"  A replayed / B replayed = {A['replay'] / B['replay']:.3f}: wall-time vs thread-CPU-time compute durations")
    print(f"\nmachine after: {machine_load()}")
    print(f"run folders: {out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""lowbw's executor against torch.distributed.pipelining: same model, same split, free links.

    python scripts/bench_overhead.py [--steps 30] [--warmup 5] [--rounds 1] [--schedules gpipe 1f1b interleaved_1f1b]
                                     [--wire auto|gloo] [--no-torch]

Model: a small GPT (6 layers, n_embd 128, 4 heads, block 128, batch 8 = 4 microbatches of 2
sequences; the model scripts/cpu_rate.py times on one thread), cut with
lowbw.pipeline.partition.partition_layers into 2 stages (4 for interleaved 1F1B: two chunks per
rank, stage s on rank s % 2), each stage a lowbw.models.gpt.GPTStage, loss = GPTStage.loss
(cross-entropy), AdamW step every step; 2 processes on gloo, one thread each, no emulated delay.
For each schedule (GPipe, 1F1B, interleaved 1F1B):

  (a) lowbw:  lowbw.train.run with net=ideal clock=wall (its executor and transport; --wire: net.wire, auto =
              activations and gradients through shared memory, as by default, gloo = everything over gloo
              as torch's);
  (b) torch:  torch.distributed.pipelining PipelineStage + ScheduleGPipe / Schedule1F1B /
              ScheduleInterleaved1F1B.

Step time is defined the same way for both: step k ends when the last rank has finished it
(its optimizer step included), step time = T_k - T_(k-1), wall clock; the first --warmup steps are
left out. Prints the config, then per schedule: the mean step time of each (ms), the ratio
lowbw / torch (goal <= 0.95), lowbw's ideal step time -- the run's own measured per-action compute
durations and optimizer times replayed through lowbw.pipeline.player.play with free links, step
by step -- and lowbw's efficiency = ideal / measured (goal >= 0.95); then each executor by that same
measure: torch's ideal step replays its own per-action compute (its stage's forward_one_chunk with its
schedule's loss, backward_one_chunk: private methods of torch 2.13, timed, left out where missing) and
optimizer seconds through the same schedule, which splits the ratio into how fast each run's compute
went (the same work: it moves with the machine between runs) and what each executor adds to it
(torch's efficiency / lowbw's: the ratio at equal compute speed);
then where lowbw's time goes per rank (compute, optimizer, codec copies, receive waits, the rest =
bookkeeping between actions) beside torch's own forward and backward time and optimizer step per rank
(its stage methods and optimizer, timed), and the losses of
both (the two compute the same thing, so the losses agree to float precision).
With --rounds > 1 the runs alternate lowbw/torch and the medians over rounds are printed. --no-torch runs
lowbw alone (its efficiency needs no torch run): to compare two versions of lowbw, run it on each in turn.
Machine load (load average) is printed before and after: the figures are timing-sensitive.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import (  # noqa: E402
    ideal_step_times,
    machine_load,
    mean_after,
    run_lowbw,
    step_ends_to_times,
    time_breakdown,
)


# ---- torch.distributed.pipelining side -------------------------------------------------------


CHUNKS = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2}  # model chunks per rank


def _torch_rank(rank: int, world: int, port: int, model: dict, schedule: str, steps: int, batch: int,
                microbatches: int, lr: float, seed: int, q) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    from lowbw.config import ModelConfig
    from lowbw.data.corpus import Corpus
    from lowbw.models.gpt import GPTStage
    from lowbw.pipeline.partition import partition_layers

    torch.set_num_threads(1)  # as lowbw's ranks (lowbw.rank.process.run_rank)
    torch.manual_seed(seed)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        cfg = ModelConfig(**model)
        n_stages = world * CHUNKS[schedule]
        ranges = partition_layers(cfg.n_layer, n_stages)
        mine = list(range(rank, n_stages, world))  # stage s on rank s % world, as lowbw places chunks
        modules = [GPTStage(cfg, *ranges[s], is_first=s == 0, is_last=s == n_stages - 1, seed=seed) for s in mine]
        stages = [PipelineStage(m, s, n_stages, torch.device("cpu")) for m, s in zip(modules, mine)]
        if schedule == "interleaved_1f1b":
            sched = ScheduleInterleaved1F1B(stages, microbatches, loss_fn=GPTStage.loss)
        else:  # scale_grads: grads of the mean loss
            sched = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule](stages[0], microbatches, loss_fn=GPTStage.loss)
        took = _time_torch_compute(type(stages[0]), type(sched))
        params = [q for m in modules for q in m.parameters()]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # lowbw's defaults
        holds_last = n_stages - 1 in mine
        corpus = Corpus(None, cfg.block_size, 0.1, seed)
        dist.barrier()
        t0 = time.perf_counter()  # CLOCK_MONOTONIC: comparable across the processes of this machine
        ends, losses, computes = [], [], []  # computes: per step, ({action label: seconds}, optimizer seconds)
        for step in range(steps):
            b = corpus.train_batch(step, batch)
            opt.zero_grad(set_to_none=True)
            args = (b.x,) if 0 in mine else ()
            if holds_last:
                mb_losses: list = []
                sched.step(*args, target=b.y, losses=mb_losses)
                losses.append(float(torch.stack(mb_losses).detach().mean()))
            else:
                sched.step(*args)
            t_opt = time.perf_counter()
            opt.step()
            ends.append(time.perf_counter())
            computes.append((dict(took) if took is not None else None, ends[-1] - t_opt))
            if took is not None:
                took.clear()
        q.put((rank, t0, ends, losses, computes))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 -- reported to the parent
        q.put((rank, None, repr(e), None, None))
        raise


def _time_torch_compute(stage_class, schedule_class) -> Optional[dict[str, float]]:
    """Wrap torch's stage-level forward and backward and its schedule's loss (private methods of torch 2.13's
    pipelining) to time each call on the wall clock: the returned dict maps lowbw's label of the action --
    "<stage>F<microbatch>" (its loss included, as lowbw's last-stage forward includes it) or
    "<stage>B<microbatch>" -- to its seconds; the caller reads and clears it each step. torch's F/B column and
    its ideal step come from it. None, and nothing timed, where torch lacks any of the three."""
    names = ((stage_class, "forward_one_chunk", "F"), (stage_class, "backward_one_chunk", "B"),
             (schedule_class, "_maybe_compute_loss", "F"))
    if not all(hasattr(cls, n) for cls, n, _ in names):
        return None
    took: dict[str, float] = {}

    def label(kind: str, stage, args: tuple, kwargs: dict, mb_name: str) -> str:
        return f"{stage.stage_index}{kind}{args[0] if args else kwargs[mb_name]}"

    for cls, name, kind in names:
        inner = getattr(cls, name)
        if name == "_maybe_compute_loss":  # (self, stage, output, target_mbs, mb_index, ...)
            def timed(self, stage, output, target_mbs, mb_index, *a, __inner=inner, **k):
                t = time.perf_counter()
                try:
                    return __inner(self, stage, output, target_mbs, mb_index, *a, **k)
                finally:
                    key = f"{stage.stage_index}F{mb_index}"
                    took[key] = took.get(key, 0.0) + time.perf_counter() - t
        else:  # (self, <fwd|bwd>_chunk_id, ...)
            def timed(self, *a, __inner=inner, __kind=kind, __mb="fwd_chunk_id" if kind == "F" else "bwd_chunk_id",
                      **k):
                t = time.perf_counter()
                try:
                    return __inner(self, *a, **k)
                finally:
                    key = label(__kind, self, a, k, __mb)
                    took[key] = took.get(key, 0.0) + time.perf_counter() - t

        setattr(cls, name, timed)
    return took


def run_torch(schedule: str, args) -> tuple[list[float], list[float], dict[int, float], list[dict]]:
    """torch.distributed.pipelining on 2 ranks: per-step times (s), last-stage losses, per rank the mean seconds
    a step of forward and backward (after the warm-up), and its compute as timeline events -- each F/B action's
    and each optimizer step's seconds, as lowbw's timeline.jsonl holds them (for its ideal step; empty where
    torch's methods could not be timed)."""
    from lowbw.launch import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    model = dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, block_size=args.block_size)
    port = free_port()
    procs = [ctx.Process(target=_torch_rank, args=(r, 2, port, model, schedule, args.steps, args.batch,
                                                   args.microbatches, args.lr, args.seed, q))
             for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        while len(results) < 2:
            rank, t0, ends, losses, computes = q.get(timeout=600)
            if t0 is None:
                raise RuntimeError(f"torch.distributed.pipelining rank {rank} failed: {ends}")
            results[rank] = (t0, ends, losses, computes)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    t0 = max(results[r][0] for r in results)
    losses = next(results[r][2] for r in sorted(results) if results[r][2])  # the rank holding the last stage
    timed = all(took is not None for r in results for took, _ in results[r][3])
    compute, events = {}, []
    for r in sorted(results):
        per_step = results[r][3]
        compute[r] = mean_after([sum(took.values()) if timed else math.nan for took, _ in per_step], args.warmup)
        for step, (took, opt_s) in enumerate(per_step if timed else []):
            events += [{"rank": r, "step": step, "kind": "forward" if "F" in label else "backward",
                        "label": label, "start": 0.0, "end": sec} for label, sec in took.items()]
            events.append({"rank": r, "step": step, "kind": "optimizer", "label": "optimizer", "start": 0.0,
                           "end": opt_s})
    return step_ends_to_times([results[r][1] for r in sorted(results)], t0), losses, compute, events


# ---- lowbw side --------------------------------------------------------------------------------


def lowbw_overrides(schedule: str, args) -> list[str]:
    chunks = [f"schedule.virtual_stages={CHUNKS[schedule]}"] if CHUNKS[schedule] > 1 else []
    return chunks + [
        f"schedule={schedule}", "net=ideal", "clock=wall", "pipeline.stages=2",
        f"pipeline.microbatches={args.microbatches}", f"model.n_layer={args.n_layer}", f"model.n_embd={args.n_embd}",
        f"model.n_head={args.n_head}", f"model.block_size={args.block_size}", f"train.batch_size={args.batch}",
        f"train.steps={args.steps}", f"train.warmup_steps={args.warmup}", f"train.lr={args.lr}", "train.eval_interval=0",
        "train.eval_batches=1", f"seed={args.seed}", "device=cpu", f"net.wire={args.wire}",
    ]


def run_lowbw_once(schedule: str, args, run_dir: Path) -> dict:
    summary, rows, events, cfg = run_lowbw(lowbw_overrides(schedule, args), run_dir, quiet=not args.verbose)
    steps = [r["step"] for r in rows]
    kept = steps[args.warmup:] if len(steps) > args.warmup else steps
    ideal = ideal_step_times(cfg, events)
    measured = {r["step"]: r["step_time_s"] for r in rows}
    return {
        "step_s": mean_after([r["step_time_s"] for r in rows], args.warmup),
        "step_wall_s": mean_after([r["step_time_wall_s"] for r in rows], args.warmup),
        "ideal_s": statistics.fmean(ideal[s] for s in kept),
        "eff_per_step": [ideal[s] / measured[s] for s in kept],
        "breakdown": time_breakdown(events, 2, kept),
        "losses": [r["loss"] for r in rows],
        "summary": summary,
        "run_dir": str(run_dir),
        "cfg": cfg,
    }


def torch_ideal(cfg, events: list[dict], steps: int, warmup: int) -> float:
    """torch's ideal step (mean over the measured steps, seconds): its own per-action compute and optimizer
    seconds replayed through the same schedule (``cfg``'s: torch's 1F1B, GPipe and interleaved orders are
    lowbw's, tests/test_schedules.py) with free links -- lowbw's ideal, for torch's run. NaN when its methods
    could not be timed."""
    if not events:
        return math.nan
    try:
        ideal = ideal_step_times(cfg, events)
    except KeyError:  # an action torch did not run: not the same schedule after all
        return math.nan
    return statistics.fmean(ideal[s] for s in range(warmup, steps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="leading steps left out of the means (>= 1)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate lowbw/torch this many times; medians printed")
    ap.add_argument("--schedules", nargs="+", default=list(CHUNKS), choices=list(CHUNKS))
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--wire", default="auto", choices=["auto", "gloo"], help="lowbw's net.wire")
    ap.add_argument("--no-torch", action="store_true", help="run lowbw alone: efficiency only, no ratio")
    ap.add_argument("--out", type=Path, default=None, help="keep lowbw's run folders here (default: a temp dir)")
    ap.add_argument("--verbose", action="store_true", help="show lowbw's own console output")
    args = ap.parse_args()
    args.warmup = max(1, args.warmup)
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")

    import torch

    from lowbw.pipeline.partition import partition_layers

    out = args.out or Path(tempfile.mkdtemp(prefix="lowbw-bench-overhead-"))
    ranges = {c: partition_layers(args.n_layer, 2 * c) for c in sorted(set(CHUNKS.values()))}
    print(f"config: GPT n_layer={args.n_layer} n_embd={args.n_embd} n_head={args.n_head} block_size={args.block_size} "
          f"vocab=256; batch {args.batch} = {args.microbatches} microbatches of {args.batch // args.microbatches}; "
          f"2 ranks, blocks per stage {ranges[1]} (interleaved: {ranges[2]}); gloo on loopback, 1 thread per rank, "
          f"AdamW lr={args.lr}; "
          f"{args.steps} steps, first {args.warmup} left out; {args.rounds} round(s); torch {torch.__version__}")
    print(f"lowbw: net=ideal clock=wall net.wire={args.wire} (no emulated delay); torch: torch.distributed.pipelining")
    print(f"machine before: {machine_load()}")
    sys.stdout.flush()

    results = {}
    for sched in args.schedules:
        lows, tors = [], []
        for i in range(args.rounds):
            lows.append(run_lowbw_once(sched, args, out / f"{sched}-{i}"))
            times, tl, tc, te = (run_torch(sched, args) if not args.no_torch
                                 else ([math.nan] * args.steps, [math.nan], {0: math.nan, 1: math.nan}, []))
            tors.append({"step_s": mean_after(times, args.warmup), "losses": tl, "compute": tc,
                         "optimizer": {r: mean_after([e["end"] for e in te if e["kind"] == "optimizer" and e["rank"] == r],
                                                     args.warmup) if te else math.nan for r in (0, 1)},
                         "ideal_s": torch_ideal(lows[-1]["cfg"], te, args.steps, args.warmup)})
            print(f"  [{sched} round {i}] lowbw {lows[-1]['step_s'] * 1e3:.1f} ms/step (eff "
                  f"{lows[-1]['ideal_s'] / lows[-1]['step_s']:.3f}), torch {tors[-1]['step_s'] * 1e3:.1f} ms/step "
                  f"(eff {tors[-1]['ideal_s'] / tors[-1]['step_s']:.3f}); {machine_load()}", flush=True)
        results[sched] = (lows, tors)

    print()
    print(f"{'schedule':<17}{'lowbw ms':>10}{'torch ms':>10}{'lowbw/torch':>13}{'ideal ms':>10}{'efficiency':>12}"
          f"  goals (ratio <= 0.95, efficiency >= 0.95); per round: ratio, efficiency")
    for sched, (lows, tors) in results.items():
        lo = statistics.median(r["step_s"] for r in lows)
        to = statistics.median(r["step_s"] for r in tors)
        ideal = statistics.median(r["ideal_s"] for r in lows)
        eff = statistics.median(r["ideal_s"] / r["step_s"] for r in lows)
        met = "met" if lo / to <= 0.95 and eff >= 0.95 else "NOT met"
        if args.no_torch:
            met = f"efficiency {'met' if eff >= 0.95 else 'NOT met'} (no torch run: no ratio)"
        ratios = [a["step_s"] / b["step_s"] for a, b in zip(lows, tors)]
        effs = [r["ideal_s"] / r["step_s"] for r in lows]
        spread = (f"; {min(ratios):.3f}-{max(ratios):.3f}, {min(effs):.3f}-{max(effs):.3f}" if len(lows) > 1 else "")
        print(f"{sched:<17}{lo * 1e3:>10.1f}{to * 1e3:>10.1f}{lo / to:>13.3f}{ideal * 1e3:>10.1f}{eff:>12.3f}  {met}{spread}")
    print("  (means over the measured steps, wall clock; medians over rounds, and their range; efficiency = ideal / lowbw)")

    if not args.no_torch:
        print("\neach executor by the same measure -- its own measured compute replayed through the schedule with free "
              "links (ideal),\nthe rest of its step its overhead; medians over rounds:")
        print(f"  {'schedule':<17}{'lowbw ideal':>12}{'overhead':>10}{'eff':>7}{'torch ideal':>13}{'overhead':>10}"
              f"{'eff':>7}{'ideal lowbw/torch':>19}{'eff torch/lowbw':>17}")
        for sched, (lows, tors) in results.items():
            row = ""
            for runs in (lows, tors):  # ideal, overhead, efficiency: medians over rounds
                row += (f"{statistics.median(r['ideal_s'] for r in runs) * 1e3:>{12 if runs is lows else 13}.1f}"
                        f"{statistics.median(r['step_s'] - r['ideal_s'] for r in runs) * 1e3:>10.1f}"
                        f"{statistics.median(r['ideal_s'] / r['step_s'] for r in runs):>7.3f}")
            speed = statistics.median(lo["ideal_s"] / to["ideal_s"] for lo, to in zip(lows, tors))
            executors = statistics.median((to["ideal_s"] / to["step_s"]) / (lo["ideal_s"] / lo["step_s"])
                                          for lo, to in zip(lows, tors))
            print(f"  {sched:<17}{row}{speed:>19.3f}{executors:>17.3f}")
        print("  (ms a step; lowbw / torch = (ideal lowbw / ideal torch) x (efficiency torch / efficiency lowbw): the\n"
              "   first factor is how fast each run's compute went -- the same work, so it moves with the machine's\n"
              "   speed between the runs --, the second how much of its step each executor adds: the ratio the two\n"
              "   would have at equal compute speed)")

    print("\nwhere lowbw's time goes, ms per step per rank (last round), and torch's forward and backward and "
          "optimizer step:")
    print(f"  {'schedule':<17}{'rank':>5}{'span':>8}{'F/B':>8}{'optim':>8}{'codec':>8}{'recv':>8}{'rest':>8}"
          f"{'torch F/B':>11}{'optim':>8}")
    for sched, (lows, tors) in results.items():
        for r, b in lows[-1]["breakdown"].items():
            print(f"  {sched:<17}{r:>5}" + "".join(f"{b[k] * 1e3:>8.1f}" for k in
                                                   ("span", "compute", "optimizer", "codec", "recv_wait", "rest"))
                  + f"{tors[-1]['compute'][r] * 1e3:>11.1f}{tors[-1]['optimizer'][r] * 1e3:>8.1f}")
    print("  (span = from the rank's previous optimizer end to this one; rest = span minus all recorded events:\n"
          "   Python between actions, rank 0's per-step metrics logging and the rank reports. F/B is wall time, so\n"
          "   it includes what other threads and processes took from a compute: the ideal step -- and the\n"
          "   efficiency -- cannot see that cost, the step time and the F/B columns side by side can)")

    print("\nlosses (last stage, mean over microbatches), last round:")
    for sched, (lows, tors) in results.items():
        lo, to = lows[-1]["losses"], tors[-1]["losses"]
        diff = max(abs(a - b) for a, b in zip(lo, to))
        print(f"  {sched:<17} lowbw step0 {lo[0]:.5f} last {lo[-1]:.5f} | torch step0 {to[0]:.5f} last {to[-1]:.5f} "
              f"| max |diff| {diff:.2e}")
    print(f"\nmachine after: {machine_load()}")
    print(f"lowbw run folders: {out}")


if __name__ == "__main__":
    main()

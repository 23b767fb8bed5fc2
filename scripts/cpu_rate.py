#!/usr/bin/env python
"""The compute rate one CPU thread of this machine reaches on a small GPT step, against hardware=cpu_local.

    python scripts/cpu_rate.py [--steps 20] [--warmup 3] [--n-layer 6] [--n-embd 128] [--block 128] [--batch 8]

One training step of the whole model in one process on one thread: forward, cross-entropy, backward,
AdamW (lowbw.models.gpt.GPTStage holding every block; batches from the bundled corpus). Each step is
timed by this thread's CPU time (``time.thread_time``: what ``clock.durations=measured`` charges, and
insensitive to other processes on the cores) and by wall time. FLOPs per step are the closed form the
simulator and ``clock.durations=flops`` use (``lowbw.models.flops.flop_formula``: matmuls and
attention, forward + backward; the optimizer is not counted). Prints the median step time, the
achieved FLOP/s, and both as fractions of the cpu_local profile's peak and effective rate
(``peak_flops * mfu``), with the CPU model, its flags and the machine load: docs/energy.md quotes it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import machine_load  # noqa: E402

from lowbw.config import ModelConfig  # noqa: E402
from lowbw.data.corpus import Corpus  # noqa: E402
from lowbw.energy.profiles import get_profile  # noqa: E402
from lowbw.models.flops import flop_formula  # noqa: E402
from lowbw.models.gpt import GPTStage  # noqa: E402


def cpu_description() -> str:
    """Model name, clock and vector extensions from /proc/cpuinfo (Linux), else the platform's name."""
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    vector = sorted(f for f in fields.get("flags", "").split() if f in ("avx", "avx2", "fma", "avx512f"))
    return (f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}), "
            f"{float(fields.get('cpu MHz', 'nan')) / 1e3:.2f} GHz, {os.cpu_count()} cores, flags {' '.join(vector)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = ModelConfig(name="rate", n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, block_size=args.block)
    model = GPTStage(cfg, 0, cfg.n_layer, True, True, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    corpus = Corpus(None, cfg.block_size, 0.1, seed=0)
    block, _, head = flop_formula(cfg, args.batch)
    flops = cfg.n_layer * (block[0] + block[1]) + head[0] + head[1]
    print(f"{cpu_description()}; torch {torch.__version__}, 1 thread; {machine_load()}")
    print(f"model: {cfg.n_layer} blocks, d={cfg.n_embd}, {cfg.n_head} heads, T={cfg.block_size}, batch {args.batch}; "
          f"{flops / 1e9:.3f} GFLOP per step (flop_formula)")
    cpu_s, wall_s = [], []
    for step in range(args.warmup + args.steps):
        b = corpus.train_batch(step, args.batch)
        c0, w0 = time.thread_time(), time.perf_counter()
        loss = GPTStage.loss(model(b.x), b.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        c1, w1 = time.thread_time(), time.perf_counter()
        if step >= args.warmup:
            cpu_s.append(c1 - c0)
            wall_s.append(w1 - w0)
    cpu, wall = statistics.median(cpu_s), statistics.median(wall_s)
    prof = get_profile("cpu_local")
    rate = flops / cpu
    print(f"step: {1e3 * cpu:.1f} ms thread CPU time, {1e3 * wall:.1f} ms wall (medians of {args.steps}; "
          f"CPU time min {1e3 * min(cpu_s):.1f}, max {1e3 * max(cpu_s):.1f})")
    print(f"rate: {rate / 1e9:.1f} GFLOP/s = {rate / prof.peak_flops:.3f} of cpu_local's peak "
          f"({prof.peak_flops / 1e9:.0f} GFLOP/s) = {rate / prof.effective_flops:.2f} x its effective rate "
          f"(peak x mfu {prof.mfu} = {prof.effective_flops / 1e9:.1f} GFLOP/s)")
    print(f"{machine_load()} after")


if __name__ == "__main__":
    main()

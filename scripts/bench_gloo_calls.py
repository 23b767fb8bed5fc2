#!/usr/bin/env python
"""What one gloo point-to-point call costs the thread that makes it: the floor under any executor on gloo.

    python scripts/bench_gloo_calls.py [--messages 200]

Two processes on this machine (gloo on loopback, one torch thread each). Rank 1 posts all its
receives first; then rank 0 sends --messages messages one by one, timing ``dist.isend`` itself (the
time the calling thread spends in it, not the transfer) and the ``wait`` after it, in three
situations:

  back-to-back:  the next send follows at once;
  after sleep:   3 ms of sleep between sends (gloo's threads have gone idle);
  after compute: a 512x512 matmul between sends (as between a pipeline's forward and its send).

for an 80-byte message and one the size of scripts/bench_overhead.py's activations (2 x 128 x 128
float32 + lowbw's 80-byte meta block). Then the same for posting a receive (``dist.irecv``). Prints
medians and 90th percentiles in microseconds. torch.distributed.pipelining makes these same calls
(``batch_isend_irecv``), so the figures are a cost both executors pay per message and receive.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES = {"80 B": 80, "131 kB": 80 + 2 * 128 * 128 * 4}
GAPS = ("back-to-back", "after sleep", "after compute")


def _rank(rank: int, port: int, n: int, q) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    a = torch.randn(512, 512)
    out = {}
    for op in ("isend", "irecv"):
        for size_name, nbytes in SIZES.items():
            for gap in GAPS:
                poster = 0 if op == "isend" else 1  # the rank whose calls are timed
                other = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(n)]
                handles = []
                if rank != poster:  # the other side posts everything first
                    handles = [(dist.irecv(b, poster, tag=5) if op == "isend" else dist.isend(b, poster, tag=5))
                               for b in other]
                dist.barrier()
                if rank == poster:
                    posted, waited = [], []
                    for i in range(n):
                        buf = torch.ones(nbytes, dtype=torch.uint8)
                        t0 = time.perf_counter()
                        h = dist.isend(buf, 1 - rank, tag=5) if op == "isend" else dist.irecv(buf, 1 - rank, tag=5)
                        t1 = time.perf_counter()
                        h.wait()
                        posted.append(t1 - t0)
                        waited.append(time.perf_counter() - t1)
                        if gap == "after sleep":
                            time.sleep(0.003)
                        elif gap == "after compute":
                            a @ a
                    out[(op, size_name, gap)] = (sorted(posted), sorted(waited))
                for h in handles:
                    h.wait()
                dist.barrier()
    q.put((rank, out))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=200, help="messages per situation")
    args = ap.parse_args()

    import multiprocessing as mp

    from _bench_common import machine_load
    from lowbw.launch import free_port

    print(f"machine before: {machine_load()}")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, args.messages, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        results.update(q.get(timeout=600)[1])
    for p in procs:
        p.join(60)

    def pct(xs: list[float], f: float) -> float:
        return xs[min(len(xs) - 1, int(f * len(xs)))] * 1e6

    print(f"\n{'call':<7}{'message':>9}  {'situation':<15}{'call us (median)':>18}{'p90':>8}{'wait us (median)':>18}")
    for (op, size, gap), (posted, waited) in results.items():
        print(f"{op:<7}{size:>9}  {gap:<15}{pct(posted, 0.5):>18.0f}{pct(posted, 0.9):>8.0f}{pct(waited, 0.5):>18.0f}")
    print("  (call = time inside dist.isend / dist.irecv on the calling thread; wait = handle.wait() after it;"
          f"\n   {args.messages} messages each, the other side's operations posted before)")
    print(f"machine after: {machine_load()}")


if __name__ == "__main__":
    main()

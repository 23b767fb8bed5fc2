#!/usr/bin/env python
"""What one call costs right after a compute, against the same call warm: why lowbw keeps the path
between two computes to few distinct calls (docs/architecture.md, "Messages").

    python scripts/bench_cold_calls.py [--repeats 60]

For each operation a message's path makes (a torch call, a numpy scalar access, a memoryview access,
struct packing, a 128 KiB copy), alternately: a compute that streams its operands through the caches
(4 matmuls of 256x1024 by 1024x1024, one thread, about what a pipeline stage's forward does to them),
then the operation once ("cold"), then once more ("warm"). Prints the median of each over the repeats,
in microseconds, and their ratio. One thread; figures vary with the machine and its other tenants.
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import struct
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ring = mmap.mmap(-1, 1 << 21)
    words = np.frombuffer(ring, np.int64, 32)
    data = np.frombuffer(ring, np.uint8, (1 << 21) - 256, 256)
    view = memoryview(ring).cast("q")
    x = torch.randn(2, 128, 128)  # an activation of scripts/bench_overhead.py's model: 128 KiB
    xb = x.view(-1).view(torch.uint8)
    lin, inp = torch.nn.Linear(1024, 1024), torch.randn(256, 1024)
    head = struct.Struct("<6q3dq")
    ops = {
        "torch: x.detach()": lambda: x.detach(),
        "torch: x.view(-1)": lambda: x.view(-1),
        "torch: x.numpy()": lambda: x.numpy(),
        "numpy: int(words[1])": lambda: int(words[1]),
        "numpy: words[0] = n": lambda: words.__setitem__(0, 12345),
        "memoryview: view[1]": lambda: view[1],
        "memoryview: view[0] = n": lambda: view.__setitem__(0, 12345),
        "struct: pack 80-byte block": lambda: head.pack(1, 2, 3, 4, 5, 6, 1.0, 2.0, 3.0, 7),
        "time.perf_counter()": time.perf_counter,
        "copy 128 KiB (numpy slice)": lambda: data.__setitem__(slice(1000, 1000 + xb.numel()), xb.numpy()),
    }
    print(f"{'operation':<30}{'cold us':>10}{'warm us':>10}{'cold/warm':>11}   (medians of {args.repeats})")
    for name, op in ops.items():
        cold, warm = [], []
        for _ in range(args.repeats):
            for _ in range(4):
                lin(inp)
            t0 = time.perf_counter()
            op()
            t1 = time.perf_counter()
            op()
            t2 = time.perf_counter()
            cold.append(t1 - t0)
            warm.append(t2 - t1)
        c, w = statistics.median(cold) * 1e6, statistics.median(warm) * 1e6
        print(f"{name:<30}{c:>10.1f}{w:>10.1f}{c / w:>11.1f}")


if __name__ == "__main__":
    main()

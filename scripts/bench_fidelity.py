#!/usr/bin/env python
"""Emulated links against the kernel's: the same training run, timed both ways, step time ratios.

    sudo python scripts/bench_fidelity.py [--rates 10 20 50] [--stages 2 4] [--schedules gpipe 1f1b]
                                          [--steps 8] [--tcp-repeats 5] [--out fidelity.json]

Needs root (network namespaces and tc; lowbw.net.kernel). For every rate, stage count and schedule
it runs one lowbw-train four times, each in a fresh process, on the wall clock:

  kernel      net.backend=kernel: every rank in a network namespace, each node's uplink and downlink
              shaped by tc to the rate (HTB up, TBF down), no emulation on top -- the ground truth;
  emulated    lowbw's link model on loopback at the same rate, the default charge (8 bits a payload
              byte: what WAN benchmarks quote);
  line        the same with net.framing=line set to what tc counts on a veth: the IP packet and its
              14-byte MAC header, 1448-byte segments (TCP timestamps on, Linux's default), 52 bytes of
              IPv4 + TCP headers (docs/networks.md, "Line rate");
  duplex      line, and net.duplex_efficiency set to the plain-TCP figure measured first at that rate
              (one-way time / both-ways time; lowbw.net.link, "Two-way contention").

First, for reference, plain TCP between two shaped namespaces: 2 MiB one way, then 2 MiB each way at
once (the time over 8 x bytes / rate; medians of --tcp-repeats transfers, with their range).

Links: rate Mbit/s up and down on every node, no latency (this kernel has no netem; where netem
exists, latency is a further axis). Model: a GPT with one block per stage, n_embd 256, 4 heads,
context 256, batch 8 in 4 microbatches of 2 sequences: every activation and gradient message is
2 x 256 x 256 float32 = 512 KiB. Step time: the median over the steps after the first (warm-up) and
before the last (which also carries the run's end), on the run's wall clock. Prints the table and
the machine's load before and after (the figures are wall-clock: run on a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Plain TCP between two shaped namespaces: a receiver that echoes one byte once it has n bytes, a sender that
# times n bytes out (and, both ways, n bytes back at the same time) until that byte.
_PEER = """
import socket, sys, threading
n, both = int(sys.argv[1]), sys.argv[2] == '1'
c, _ = socket.create_server((sys.argv[3], 7001)).accept()
if both:
    threading.Thread(target=c.sendall, args=(b'y' * n,)).start()
got = 0
while got < n:
    got += len(c.recv(1 << 20))
c.sendall(b'k')
"""
_TIMER = """
import socket, sys, threading, time
n, both = int(sys.argv[1]), sys.argv[2] == '1'
for _ in range(200):
    try:
        c = socket.create_connection((sys.argv[3], 7001)); break
    except OSError:
        time.sleep(0.05)
want = n + 1 if both else 1  # the peer's n bytes (both ways) and its final byte
t0 = time.perf_counter()
def take():
    got = 0
    while got < want:
        chunk = c.recv(1 << 20)
        if not chunk:
            raise SystemExit('the peer closed early')
        got += len(chunk)
r = threading.Thread(target=take); r.start()
c.sendall(b'x' * n)
r.join()
print(time.perf_counter() - t0)
"""


def raw_tcp(rate: float, nbytes: int, both: bool) -> float:
    """Seconds for ``nbytes`` over plain TCP between two namespaces shaped to ``rate`` (and back, if ``both``)."""
    from omegaconf import OmegaConf

    from lowbw.config import NetConfig
    from lowbw.net.kernel import KernelNetwork, address
    from lowbw.net.topology import Topology

    net = OmegaConf.structured(NetConfig(latency_ms=0.0, uplink_mbps=rate, downlink_mbps=rate))
    with KernelNetwork(Topology.from_config(net, 2)) as k:
        argv = [str(nbytes), "1" if both else "0", address(1)]
        peer = subprocess.Popen(["ip", "netns", "exec", k.nodes[1], sys.executable, "-c", _PEER, *argv])
        try:
            t = subprocess.run(["ip", "netns", "exec", k.nodes[0], sys.executable, "-c", _TIMER, *argv],
                               capture_output=True, text=True, timeout=600, check=True).stdout
        finally:
            peer.wait(timeout=60)
    return float(t)


LINE = ["net.framing=line", "net.mss_bytes=1448", "net.tcp_ip_header_bytes=52", "net.ethernet_overhead_bytes=14"]
VARIANTS = ("kernel", "emulated", "line", "duplex")


def overrides(variant: str, duplex_efficiency: float) -> list[str]:
    return {"kernel": ["net.backend=kernel"], "emulated": [], "line": LINE,
            "duplex": [*LINE, f"net.duplex_efficiency={duplex_efficiency:.4f}"]}[variant]


def run_once(rate: float, stages: int, schedule: str, steps: int, extra: list[str], out: Path) -> float:
    """Median step time (s, wall) of one run."""
    cmd = [sys.executable, "-m", "lowbw.train", "clock=wall", "net=home", "net.latency_ms=0",
           f"net.uplink_mbps={rate}", f"net.downlink_mbps={rate}", f"pipeline.stages={stages}",
           f"model.n_layer={stages}", "model.n_embd=256", "model.n_head=4", "model.block_size=256",
           "train.batch_size=8", "pipeline.microbatches=4", f"schedule={schedule}", f"train.steps={steps}",
           f"out_dir={out}", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["step_time_s"] for r in rows[1:-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[10, 20, 50], help="Mbit/s, up and down")
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--tcp-repeats", type=int, default=5, help="plain-TCP transfers per rate and direction")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()
    if args.steps < 3:
        ap.error("--steps must be at least 3 (the first and the last are left out)")
    if os.geteuid() != 0:
        raise SystemExit("bench_fidelity needs root: it makes network namespaces and shapes them with tc")
    print(f"load average before: {os.getloadavg()}", flush=True)
    t0 = time.perf_counter()
    nbytes = 4 * 512 * 1024  # a step's messages one way in the 2-stage runs below
    print(f"plain TCP, {nbytes:,} bytes, shaped namespaces (ratio: time / (8 x bytes / rate)):")
    efficiency = {}
    for rate in args.rates:
        ideal = 8 * nbytes / (rate * 1e6)
        ones = [raw_tcp(rate, nbytes, False) for _ in range(args.tcp_repeats)]
        twos = [raw_tcp(rate, nbytes, True) for _ in range(args.tcp_repeats)]
        one, two = statistics.median(ones), statistics.median(twos)
        efficiency[rate] = min(1.0, one / two)
        print(f"  {rate:g} Mbit/s: one way {one:.3f} s ({one / ideal:.3f}; {min(ones):.3f}-{max(ones):.3f}), both ways "
              f"at once {two:.3f} s ({two / ideal:.3f}; {min(twos):.3f}-{max(twos):.3f}): duplex efficiency "
              f"{efficiency[rate]:.3f} (medians of {args.tcp_repeats})", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="lowbw-fidelity-") as tmp:
        for rate in args.rates:
            for stages in args.stages:
                for schedule in args.schedules:
                    row = {"rate_mbps": rate, "stages": stages, "schedule": schedule,
                           "duplex_efficiency": efficiency[rate]}
                    for variant in VARIANTS:
                        out = Path(tmp) / f"{rate}-{stages}-{schedule}-{variant}"
                        row[variant] = run_once(rate, stages, schedule, args.steps,
                                                overrides(variant, efficiency[rate]), out)
                    for variant in VARIANTS[1:]:
                        row[f"kernel/{variant}"] = row["kernel"] / row[variant]
                    results.append(row)
                    print(f"  {rate:g} Mbit/s, {stages} stages, {schedule}: kernel {row['kernel']:.3f} s; "
                          + ", ".join(f"{v} {row[v]:.3f} s ({row['kernel/' + v]:.3f})" for v in VARIANTS[1:]),
                          flush=True)
    print(f"load average after: {os.getloadavg()}; {time.perf_counter() - t0:.0f} s in all\n")
    print("| Mbit/s | stages | schedule | kernel s/step | emulated s/step (kernel / it) | line-framed | "
          "line-framed + duplex |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in results:
        cells = " | ".join(f"{r[v]:.3f} ({r['kernel/' + v]:.3f})" for v in VARIANTS[1:])
        print(f"| {r['rate_mbps']:g} | {r['stages']} | {r['schedule']} | {r['kernel']:.3f} | {cells} |")
    for key in (f"kernel/{v}" for v in VARIANTS[1:]):
        vals = [r[key] for r in results]
        print(f"{key}: median {statistics.median(vals):.3f}, range {min(vals):.3f}-{max(vals):.3f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Pivot report.csv of the bandwidth x codec x schedule sweep into the tables the README quotes.

    python experiments/bandwidth_vs_compression/summarise.py [path/to/report.csv]

Prints Markdown: (1) tokens/s (virtual clock) and speed-up over the uncompressed run on the same bandwidth and
schedule; (2) J/token (modelled) with its compute / idle / network split; (3) bytes/token and loss by codec.
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def num(x: str):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "report.csv"
    rows = [r for r in csv.DictReader(open(path))]
    done = [r for r in rows if r["status"] == "completed"]
    bad = [r for r in rows if r["status"] != "completed"]
    bws = sorted({num(r["bandwidth_mbps"]) for r in done})
    codecs = sorted({r["codec"] for r in done}, key=lambda c: (c != "none/none", c))
    scheds = sorted({r["schedule"] for r in done})
    cell = {(num(r["bandwidth_mbps"]), r["codec"], r["schedule"]): r for r in done}

    print("### Throughput, tokens/s on the virtual clock (speed-up over none/none, same bandwidth and schedule)\n")
    print("| Mbit/s | schedule | " + " | ".join(codecs) + " |")
    print("|---|---|" + "---|" * len(codecs))
    for bw in bws:
        for s in scheds:
            base = cell.get((bw, "none/none", s))
            out = []
            for c in codecs:
                r = cell.get((bw, c, s))
                if r is None:
                    out.append("–")
                    continue
                t = num(r["tokens_per_s"])
                sp = f" ({t / num(base['tokens_per_s']):.2f}×)" if base and c != "none/none" else ""
                out.append(f"{t:,.0f}{sp}")
            print(f"| {bw:g} | {s} | " + " | ".join(out) + " |")

    print("\n### Energy, J/token (modelled): total = compute + idle + network\n")
    print("| Mbit/s | schedule | codec | J/token | compute | idle | network | bubble |")
    print("|---|---|---|---|---|---|---|---|")
    for bw in bws:
        for s in scheds:
            for c in codecs:
                r = cell.get((bw, c, s))
                if r:
                    print(f"| {bw:g} | {s} | {c} | {num(r['j_per_token']):.4f} | {num(r['compute_j_per_token']):.2e} | "
                          f"{num(r['idle_j_per_token']):.4f} | {num(r['network_j_per_token']):.4f} | "
                          f"{num(r['bubble_fraction']):.3f} |")

    print("\n### Bytes and loss by codec (measured; identical across bandwidths and schedules when the training is)\n")
    print("| codec | bytes/token | fwd ratio | bwd ratio | train loss (range over runs) | val loss (range) | "
          "val loss gap (range) |")
    print("|---|---|---|---|---|---|---|")
    by = defaultdict(list)
    for r in done:
        by[r["codec"]].append(r)
    for c in codecs:
        rs = by[c]

        def rng(k, fmt):
            v = [num(r[k]) for r in rs if num(r[k]) is not None]
            if not v:
                return "–"
            lo, hi = min(v), max(v)
            return format(lo, fmt) if abs(hi - lo) < 1e-12 else f"{format(lo, fmt)} … {format(hi, fmt)}"

        print(f"| {c} | {rng('bytes_per_token', ',.1f')} | {rng('fwd_ratio', '.3g')} | {rng('bwd_ratio', '.3g')} | "
              f"{rng('train_loss', '.4f')} | {rng('val_loss', '.4f')} | {rng('val_loss_gap', '+.4f')} |")
    if bad:
        print("\nRuns that did not complete:\n")
        for r in bad:
            print(f"- {r['run']}: {r['status']} {r['codec']} {r['schedule']} {r['bandwidth_mbps']} Mbit/s: {r['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

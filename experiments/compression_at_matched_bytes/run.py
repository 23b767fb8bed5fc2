"""Study: at 32x, 64x and 128x fewer bytes per token than float32 activations, which compression costs least?

Cells, each a lowbw-train run (pipeline stages over ideal links on the virtual clock: the loss does
not depend on the links; bytes are the payloads' real lengths): the dense model with no codec, int8,
top-k and PowerSGD (codecs), subspace networks, residual bottlenecks and column sparsification
(boundary methods), and the boundary methods with int8 on what crosses. Each cell's size is worked
out from the byte budget of its target ratio R with the formulas of docs/compression.md: a budget of
4 d / R bytes a token for each direction, float32 values (4 bytes), int8 ~ 1 + 4/64 bytes a value
(block 64, two bfloat16 stats), top-k 6 bytes a kept entry (float32 + int16 index), PowerSGD
4 r (1 + d / N) bytes a token (N tokens a microbatch), subspace + 2 bytes of token id forward.

    python experiments/compression_at_matched_bytes/run.py               # the study: results here
    python experiments/compression_at_matched_bytes/run.py --steps 5 --ratios 32 --seeds 0 --out /tmp/cmb \
        --layers 2 --width 32 --context 32                               # a smoke run

Writes results.csv (one row a run: cell, ratio, seed, bytes per token measured, validation loss),
results.md, pareto.png (validation loss against bytes per token, the Pareto front drawn) and
curves.png (training loss against steps). Runs land in <out>/runs/<cell>_seed<k>/; a folder holding a
completed run is reused, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file backend)

from lowbw.train import compose, run  # noqa: E402

HERE = Path(__file__).resolve().parent
INT8_BYTES = 1 + 4 / 64  # a code + two bfloat16 block stats per 64 values (configs/compress/fwd/int8.yaml)
TOPK_BYTES = 6  # float32 value + int16 index (docs/compression.md, top-k)
ID_BYTES = 2  # subspace: the token id, forward only (lowbw.boundary.TOKEN_ID_BYTES)


def cells(ratio: int, d: int, tokens: int) -> dict[str, list[str]]:
    """Cell name -> overrides for one target ratio: each size the largest that fits 4 d / ratio bytes a token."""
    budget = 4 * d / ratio
    both = lambda codec: [f"compress/fwd={codec}", f"compress/bwd={codec}"]  # noqa: E731
    out = {
        f"topk_{ratio}x": both("topk") + [f"compress.fwd.ratio={budget / TOPK_BYTES / d:.6g}",
                                          f"compress.bwd.ratio={budget / TOPK_BYTES / d:.6g}"],
        f"powersgd_{ratio}x": both("powersgd") + [f"compress.{k}.rank={max(1, int(budget / (4 * (1 + d / tokens))))}"
                                                  for k in ("fwd", "bwd")],
    }
    for codec, per_value in (("none", 4), ("int8", INT8_BYTES)):
        tag = "" if codec == "none" else "+int8"
        extra = both(codec) if codec != "none" else []
        out[f"subspace{tag}_{ratio}x"] = ["boundary=subspace",
                                          f"boundary.rank={max(1, int((budget - ID_BYTES) / per_value))}"] + extra
        out[f"bottleneck{tag}_{ratio}x"] = ["boundary=bottleneck",
                                            f"boundary.width={max(1, int(budget / per_value))}"] + extra
        out[f"columns{tag}_{ratio}x"] = ["boundary=columns",
                                         f"boundary.keep={max(1, int(budget / per_value)) / d:.6g}"] + extra
    return out


def base(args: argparse.Namespace, seed: int) -> list[str]:
    return [f"seed={seed}", f"model.n_layer={args.layers}", f"model.n_embd={args.width}", f"model.n_head={args.heads}",
            f"model.block_size={args.context}", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
            f"train.eval_batches={args.eval_batches}", f"train.eval_interval={args.eval_interval}",
            f"pipeline.stages={args.stages}", f"pipeline.microbatches={args.microbatches}", "schedule=1f1b",
            "net=ideal", "clock=virtual", "clock.durations=flops", "progress=false"]


def train(name: str, overrides: list[str], seed: int, args: argparse.Namespace) -> tuple[dict, Path]:
    run_dir = args.out / "runs" / f"{name}_seed{seed}"
    done = run_dir / "summary.json"
    if done.is_file() and json.loads(done.read_text()).get("status") == "completed":
        return json.loads(done.read_text()), run_dir
    t0 = time.perf_counter()
    summary = run(compose(base(args, seed) + overrides), run_dir)
    print(f"{run_dir.name}: val_loss {summary['val_loss']:.4f}, {summary['bytes_per_token']:.1f} bytes/token "
          f"({time.perf_counter() - t0:.0f} s wall)", flush=True)
    return summary, run_dir


def plan(args: argparse.Namespace) -> list[tuple[str, int | None, list[str]]]:
    """(cell, target ratio or None, overrides): the references once, every sized cell per ratio."""
    tokens = args.batch // args.microbatches * args.context
    out = [("none", None, []), ("int8", None, ["compress/fwd=int8", "compress/bwd=int8"])]
    for ratio in args.ratios:
        out += [(name, ratio, o) for name, o in cells(ratio, args.width, tokens).items()]
    return out


def leading(planned: list, rows: list[dict], lead: int) -> list:
    """The cells that get the further seeds: the references, and per target ratio the ``lead`` cells with
    the lowest first-seed validation loss (``lead < 0``: every cell)."""
    first = {r["cell"]: r["val_loss"] for r in rows}
    out = [p for p in planned if p[1] is None]
    for ratio in dict.fromkeys(p[1] for p in planned if p[1] is not None):
        sized = sorted((p for p in planned if p[1] == ratio), key=lambda p: first[p[0]])
        out += sized if lead < 0 else sized[:lead]
    return out


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both bytes and loss, by bytes."""
    front, best = [], float("inf")
    for b, loss in sorted(points):
        if loss < best:
            front.append((b, loss))
            best = loss
    return front


def figures(rows: list[dict], curves: dict[str, list[float]], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for cell in dict.fromkeys(r["cell"] for r in rows):
        sel = [r for r in rows if r["cell"] == cell]
        ax.scatter([r["bytes_per_token"] for r in sel], [r["val_loss"] for r in sel], s=14, label=cell)
    front = pareto([(r["bytes_per_token"], r["val_loss"]) for r in rows])
    ax.plot(*zip(*front), color="black", lw=1, label="Pareto front")
    ax.set(xscale="log", xlabel="bytes sent per token (all boundaries, both ways)", ylabel="validation loss (nats)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=150)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, losses in curves.items():
        ax.plot(range(len(losses)), losses, lw=0.8, label=name)
    ax.set(xlabel="step", ylabel="training loss (nats)")
    ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=150)


def table(rows: list[dict]) -> str:
    out = ["| cell | target | bytes/token | validation loss (mean) | per seed |", "|---|---:|---:|---:|---|"]
    for cell in dict.fromkeys(r["cell"] for r in rows):
        sel = [r for r in rows if r["cell"] == cell]
        losses = [r["val_loss"] for r in sel]
        target = f"{sel[0]['ratio']}x" if sel[0]["ratio"] else "-"
        out.append(f"| {cell} | {target} | {statistics.mean(r['bytes_per_token'] for r in sel):.1f} | "
                   f"{statistics.mean(losses):.4f} | {', '.join(f'{v:.4f}' for v in losses)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE, help="folder for runs/, results.csv, results.md, figures")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                    help="the first seed runs every cell; the others run the references and the --lead cells")
    ap.add_argument("--lead", type=int, default=1,
                    help="cells per target ratio (lowest first-seed loss) that also run the further seeds; -1: all")
    ap.add_argument("--ratios", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=128, help="bytes per sequence")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--eval-interval", type=int, default=0)
    args = ap.parse_args(argv)
    rows, curves = [], {}
    cells_planned = plan(args)

    def record(cell: str, ratio: int | None, overrides: list[str], seed: int) -> None:
        summary, run_dir = train(cell, overrides, seed, args)
        rows.append({"cell": cell, "ratio": ratio, "seed": seed, "bytes_per_token": summary["bytes_per_token"],
                     "val_loss": summary["val_loss"], "train_loss": summary["train_loss"]})
        if cell not in curves:
            curves[cell] = [json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl")]

    for cell, ratio, overrides in cells_planned:
        record(cell, ratio, overrides, args.seeds[0])
    for cell, ratio, overrides in leading(cells_planned, rows, args.lead):
        for seed in args.seeds[1:]:
            record(cell, ratio, overrides, seed)
    order = {cell: i for i, (cell, *_) in enumerate(cells_planned)}
    rows.sort(key=lambda r: (order[r["cell"]], r["seed"]))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = table(rows)
    (args.out / "results.md").write_text(md)
    figures(rows, curves, args.out)
    print(md)
    print(f"wrote results.csv, results.md, pareto.png, curves.png in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

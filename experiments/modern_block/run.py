"""Study: the GPT-2 block with AdamW, the modern block with AdamW, the modern block with Muon.

On the bundled corpus, at one model size and the same number of steps, for each arm and seed:
train with lowbw-train (2 pipeline stages, ideal links, virtual clock: the loss does not depend on
the links, and pipelined gradients equal one process's), record the validation loss, then load the
final weights into one process and measure, after every block (every place a stage boundary can
go, i.e. all but the last), the activations' and their gradients' max/RMS ratio and effective rank
(lowbw.models.boundary_stats) on the validation batches.

    python experiments/modern_block/run.py                      # the study: results.csv, results.md here
    python experiments/modern_block/run.py --steps 5 --seeds 0 --out /tmp/mb --width 32 --context 32   # a smoke run

Runs land in <out>/runs/<arm>_seed<k>/ (lowbw's usual run folder); a run folder holding a completed
run is reused, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from lowbw.checkpoint import load
from lowbw.data.corpus import Corpus
from lowbw.models.boundary_stats import boundary_stats
from lowbw.models.gpt import GPT
from lowbw.pipeline.partition import partition_layers
from lowbw.train import compose, run

HERE = Path(__file__).resolve().parent
ARMS = {
    "gpt2_adamw": ["model.arch=gpt2", "train.optimizer=adamw"],
    "modern_adamw": ["model.arch=modern", "train.optimizer=adamw"],
    "modern_muon": ["model.arch=modern", "train.optimizer=muon"],
}
STAGES = 2
STAT_KEYS = ("act_max_over_rms", "act_effective_rank", "grad_max_over_rms", "grad_effective_rank")


def overrides(arm: str, seed: int, args: argparse.Namespace) -> list[str]:
    return ARMS[arm] + [
        f"seed={seed}", f"model.n_layer={args.layers}", f"model.n_embd={args.width}", f"model.n_head={args.heads}",
        f"model.block_size={args.context}", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
        f"train.eval_batches={args.eval_batches}", "train.eval_interval=0", f"pipeline.stages={STAGES}",
        "pipeline.microbatches=4", "schedule=1f1b", "net=ideal", "clock=virtual", "clock.durations=flops",
        f"checkpoint.every={args.steps}", "checkpoint.keep=1", "progress=false",
    ]


def train(arm: str, seed: int, args: argparse.Namespace) -> tuple[dict, Path]:
    run_dir = args.out / "runs" / f"{arm}_seed{seed}"
    done = run_dir / "summary.json"
    if done.is_file() and json.loads(done.read_text()).get("status") == "completed":
        print(f"{run_dir.name}: completed earlier, reused", flush=True)
        return json.loads(done.read_text()), run_dir
    t0 = time.perf_counter()
    summary = run(compose(overrides(arm, seed, args)), run_dir)
    print(f"{run_dir.name}: val_loss {summary['val_loss']:.4f} ({time.perf_counter() - t0:.0f} s wall)", flush=True)
    return summary, run_dir


def final_model(arm: str, seed: int, args: argparse.Namespace, run_dir: Path) -> tuple[GPT, Corpus, object]:
    """The trained model in one process, weights from the run's last checkpoint (stage s on rank s)."""
    cfg = compose(overrides(arm, seed, args))
    model = GPT(cfg.model, partition_layers(cfg.model.n_layer, STAGES, None), cfg.seed)
    for s, stage in enumerate(model.stages):
        stage.load_state_dict(load(run_dir / "checkpoints", s, args.steps - 1)["model"][str(s)])
    corpus = Corpus(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction, cfg.seed)
    return model, corpus, cfg


def measure(arm: str, seed: int, args: argparse.Namespace) -> list[dict]:
    summary, run_dir = train(arm, seed, args)
    model, corpus, cfg = final_model(arm, seed, args, run_dir)
    batches = [(b.x, b.y) for b in (corpus.val_batch(i, cfg.train.batch_size) for i in range(cfg.train.eval_batches))]
    rows = []
    for st in boundary_stats(model, batches)[:-1]:  # the last block's output goes to the head on its own stage
        rows.append({"arm": arm, "seed": seed, "val_loss": summary["val_loss"], "train_loss": summary["train_loss"],
                     **st})
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    """Markdown: validation loss per arm (mean of seeds, each seed), then the statistics per block."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    out = [f"Model: {args.layers} blocks, width {args.width}, {args.heads} heads, context {args.context} bytes; "
           f"{args.steps} steps of {args.batch} sequences; validation on {args.eval_batches} batches. "
           f"Seeds {', '.join(map(str, args.seeds))}.", "",
           "| arm | validation loss (mean) | per seed |", "|---|---:|---|"]
    for arm in arms:
        per_seed = {r["seed"]: r["val_loss"] for r in rows if r["arm"] == arm}
        out.append(f"| {arm} | {statistics.mean(per_seed.values()):.4f} | "
                   + ", ".join(f"{v:.4f}" for v in per_seed.values()) + " |")
    out += ["", "After block *i* (a boundary after it sends these activations forward and receives these "
            f"gradients back); mean over seeds; width {rows[0]['width']} is the largest possible effective rank.", "",
            "| arm | block | act max/RMS | act eff. rank | grad max/RMS | grad eff. rank |",
            "|---|---:|---:|---:|---:|---:|"]
    for arm in arms:
        for block in sorted({r["block"] for r in rows}):
            sel = [r for r in rows if r["arm"] == arm and r["block"] == block]
            vals = [statistics.mean(r[k] for r in sel) for k in STAT_KEYS]
            out.append(f"| {arm} | {block} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE, help="folder for runs/, results.csv, results.md")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=128, help="bytes per sequence")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--eval-batches", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [r for arm in args.arms for seed in args.seeds for r in measure(arm, seed, args)]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = table(rows, args)
    (args.out / "results.md").write_text(md)
    print(md)
    print(f"wrote {args.out / 'results.csv'} and {args.out / 'results.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()

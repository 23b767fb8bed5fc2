"""Stages or replicas: 8 home-broadband nodes, a 1.2 B GPT's regime, pipelines of 8, 4 or 2 stages.

    nice -n 5 python experiments/replicas_vs_stages/study.py              # the runs (resumable), then tables
    nice -n 5 python experiments/replicas_vs_stages/study.py --tables     # tables from the runs there are
    nice -n 5 python experiments/replicas_vs_stages/study.py --seeds 1 2  # more seeds

Each cell is one lowbw-train run: a tiny GPT (8 blocks) learns in 8 processes -- S stages x R replicas --
while its virtual clock keeps the regime of a 1.2 B GPT (regime=gpt_1b) on 8 RTX 4090s over home broadband
(net=home: 20 Mbit/s up, 100 Mbit/s down, 25 ms one way). Every cell trains on the same 16 sequences per
step in microbatches of 2: R replicas of batch 16 / R. A replica's synchronisation is charged the target's
parameters (lowbw/replicas/charge.py), its pipeline messages the target's activations. The run's own
summary gives the time and joules at which validation first reached the target (lowbw.metrics.target).

Adding a method: one entry in METHODS.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowbw.metrics.target import time_to_target
from lowbw.train import compose, run

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
# validation losses, nats/byte: 2.7 fixed before the runs (experiments/time_to_loss reached it in 80 steps; the runs'
# own summaries use it); 2.5 added after them, to see which method keeps its lead further down
TARGETS = (2.7, 2.5)
TARGET = TARGETS[0]
STEPS, GLOBAL_BATCH, MICROBATCH = 120, 16, 2
SHAPES = [(8, 1), (4, 2), (2, 4)]  # (stages, replicas): 8 nodes each
METHODS = {
    "allreduce": ["replicas/sync=allreduce"],
    "diloco10": ["replicas/sync=diloco", "replicas.sync.every=10"],
    "diloco50": ["replicas/sync=diloco", "replicas.sync.every=50"],
    "sparta": ["replicas/sync=sparta"],  # 0.1 % of the parameters averaged each step
}
COMMON = ["model=tiny", "model.n_layer=8", "regime=gpt_1b", "hardware=rtx4090", "net=home", "schedule=1f1b",
          f"train.steps={STEPS}", "train.eval_interval=10", "train.eval_batches=2", f"train.target_loss={TARGET}",
          "progress=false", "energy.meter=none"]


def cells() -> list[tuple[str, list[str]]]:
    out = []
    for stages, replicas in SHAPES:
        batch = GLOBAL_BATCH // replicas
        shape = [f"pipeline.stages={stages}", f"replicas.count={replicas}", f"train.batch_size={batch}",
                 f"pipeline.microbatches={batch // MICROBATCH}"]
        for method, sync in (METHODS.items() if replicas > 1 else [("none", [])]):
            out.append((f"S{stages}xR{replicas}-{method}", shape + sync))
    return out


def run_all(seeds: list[int]) -> None:
    for seed in seeds:
        for name, overrides in cells():
            out = RUNS / f"{name}-seed{seed}"
            summary = out / "summary.json"
            if summary.exists() and json.loads(summary.read_text()).get("status") == "completed":
                continue
            print(f"run {out.name}", flush=True)
            run(compose(COMMON + overrides + [f"seed={seed}", f"out_dir={out}"]), out)


def results() -> list[dict]:
    rows = []
    for name, _ in cells():
        for summary_path in sorted(RUNS.glob(f"{name}-seed*/summary.json")):
            s = json.loads(summary_path.read_text())
            if s.get("status") != "completed":
                continue
            metrics = [json.loads(x) for x in (summary_path.parent / "metrics.jsonl").read_text().splitlines()]
            at = {}
            for target in TARGETS:
                p = time_to_target(metrics, target)["first_crossing"]
                at[str(target)] = None if p is None else {"step": p["step"], "hours": p["time_s"] / 3600,
                                                          "mj": p["energy_j"] / 1e6}
            rows.append({"cell": name, "seed": int(summary_path.parent.name.rsplit("seed", 1)[1]), "targets": at,
                         "step_time_s": s["step_time_s"], "bytes_per_token": s["bytes_per_token"],
                         "sync_bytes_per_token": s["sync_bytes_per_token"], "val_loss": s["val_loss"],
                         "run_wall_s": s["run_wall_s"]})
    return rows


def _fmt(values: list, fmt: str) -> str:
    """Each seed's value, in seed order ("49 / 79"), or one value when they agree."""
    shown = [format(v, fmt) if v is not None else "not reached" for v in values]
    return shown[0] if len(set(shown)) == 1 else " / ".join(shown)


def tables(rows: list[dict]) -> str:
    lines = ["Seeds in order, one value when they agree. Time on the virtual clock of the regime "
             "(gpt_1b on 8 x rtx4090 over net=home).", "",
             "| S × R, sync | step time (s) | bytes/token (of which between replicas) | final val loss |",
             "|---|---:|---:|---:|"]
    for name, _ in cells():
        mine = sorted((r for r in rows if r["cell"] == name), key=lambda r: r["seed"])
        if mine:
            lines.append(f"| {name} | {_fmt([r['step_time_s'] for r in mine], '.1f')} | "
                         f"{_fmt([r['bytes_per_token'] for r in mine], ',.0f')} "
                         f"({_fmt([r['sync_bytes_per_token'] for r in mine], ',.0f')}) | "
                         f"{_fmt([r['val_loss'] for r in mine], '.3f')} |")
    for target in TARGETS:
        lines += ["", f"### Validation loss {target}" + (" (fixed before the runs)" if target == TARGET else
                                                          " (added after the runs)"), "",
                  "| S × R, sync | step reached | time to target (h) | energy to target (MJ) |", "|---|---:|---:|---:|"]
        for name, _ in cells():
            mine = sorted((r for r in rows if r["cell"] == name), key=lambda r: r["seed"])
            at = [r["targets"][str(target)] for r in mine]
            if mine:
                lines.append(f"| {name} | {_fmt([a and a['step'] for a in at], 'd')} | "
                             f"{_fmt([a and a['hours'] for a in at], '.2f')} | {_fmt([a and a['mj'] for a in at], '.2f')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--tables", action="store_true", help="only write the tables from the runs there are")
    args = ap.parse_args()
    if not args.tables:
        run_all(args.seeds)
    rows = results()
    (HERE / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    (HERE / "tables.md").write_text(tables(rows))
    print(tables(rows))


if __name__ == "__main__":
    main()

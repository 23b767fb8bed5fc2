#!/usr/bin/env bash
# Bubble fraction vs microbatches, p = 4, from real lowbw-train runs (virtual clock, planned durations
# T_F = 1 s, full backward 2 s = T_I + T_W with T_I = T_W = 1 s, free links) and from lowbw-simulate.
# Run from the repository root: bash experiments/bubble_vs_microbatches/run.sh
# These are the commands that produced sweep/ (see README.md). On a loaded machine each lowbw-train run
# costs ~60-90 s of wall time (process start-up and torch imports; 2 steps), so the lowbw-train grid below
# is a subset: gpipe m=1..16, 1f1b m=1,2,4, zb_h1 m=1,4,16, interleaved v=2 m=4,16. The full lowbw-train
# grid is FULL=1 (18 runs, ~25 min here); lowbw-simulate covers every cell in ~1 min.
set -euo pipefail
OUT=experiments/bubble_vs_microbatches/sweep
COMMON="pipeline.stages=4 model.n_layer=8 train.batch_size=16 train.steps=2 train.eval_batches=1 progress=false \
  clock=virtual clock.durations=fixed clock.forward_s=1 clock.backward_s=2 net=ideal"
if [[ "${FULL:-0}" == 1 ]]; then
  lowbw-train -m $COMMON schedule=gpipe,1f1b,zb_h1 pipeline.microbatches=1,2,4,8,16 hydra.sweep.dir=$OUT/train_a
  lowbw-train -m $COMMON schedule=interleaved_1f1b schedule.virtual_stages=2 pipeline.microbatches=4,8,16 \
    hydra.sweep.dir=$OUT/train_b
else
  # 1) gpipe and 1f1b (this sweep was stopped after its 8th run, 1f1b m=4, to save time)
  lowbw-train -m $COMMON schedule=gpipe,1f1b,zb_h1 pipeline.microbatches=1,2,4,8,16 hydra.sweep.dir=$OUT/train_a || true
  # 2) ZB-H1
  lowbw-train -m $COMMON schedule=zb_h1 pipeline.microbatches=1,4,16 hydra.sweep.dir=$OUT/train_c
  # 3) interleaved 1F1B, v = 2 (m divisible by p = 4; n_layer = 8 >= p*v)
  lowbw-train -m $COMMON schedule=interleaved_1f1b schedule.virtual_stages=2 pipeline.microbatches=4,16 \
    hydra.sweep.dir=$OUT/train_b
fi
# 4) lowbw-simulate, the full grid (no tensors, no processes)
SIM="model=tiny model.n_layer=8 pipeline.stages=4 net=ideal hardware=cpu_local sim.durations=fixed \
  sim.forward_s=1 sim.backward_s=2 sim.steps=2 sim.picture_steps=0"
lowbw-simulate -m $SIM schedule=gpipe,1f1b,zb_h1 pipeline.microbatches=1,2,4,8,16 hydra.sweep.dir=$OUT/sim_a
lowbw-simulate -m $SIM schedule=interleaved_1f1b schedule.virtual_stages=2 pipeline.microbatches=4,8,16 \
  hydra.sweep.dir=$OUT/sim_b
# 5) table and plot
python experiments/bubble_vs_microbatches/analyse.py

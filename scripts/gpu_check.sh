#!/usr/bin/env bash
# Check lowbw's GPU path on a machine with CUDA GPUs: a 2-stage pipeline on cuda for a few steps, its losses
# against the CPU run of the same seed, its energy measured through Zeus/NVML against the modelled figure,
# and the step time. Installs nothing: it uses the torch (and Zeus, if present) already there.
#
#   bash scripts/gpu_check.sh                  # on a GPU machine
#   bash scripts/gpu_check.sh --help           # options (steps, model, hardware profile, tolerance)
#
# Without a CUDA GPU it says so and exits 0. Exit 1: the losses disagree or a run failed. Details:
# scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch, lowbw" >/dev/null 2>&1; then
  echo "gpu_check: torch or lowbw does not import with $PY; install first: bash scripts/install.sh" >&2
  exit 1
fi
exec "$PY" scripts/gpu_check.py "$@"

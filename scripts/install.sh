#!/usr/bin/env bash
# Install lowbw from this checkout (editable), keeping any torch the machine already has.
#
#   bash scripts/install.sh          # lowbw and what it needs to run
#   bash scripts/install.sh test     # ... plus what the tests need
#
# torch: a torch that imports (your own CPU or CUDA build) is kept as it is. Only when there is
# none is "$LOWBW_TORCH" installed (default torch==2.13.0; on a CPU-only machine you may want
#   LOWBW_TORCH=torch==2.13.0 PIP_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/install.sh
# to avoid downloading a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "install.sh: no torch found; installing ${LOWBW_TORCH:-torch==2.13.0}"
  "$PY" -m pip install --quiet "${LOWBW_TORCH:-torch==2.13.0}"
fi
extra=""
if [ "${1:-}" = "test" ]; then extra="[test]"; fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".${extra}"

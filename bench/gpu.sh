#!/usr/bin/env bash
# Extraction at the GPU's speed (bench/gpu.py): extract / bare forward per backbone and --decode,
# start-up, peak GPU memory, feature differences, 12 MP photo rate, predict rate. About 8
# minutes on one GPU. `bash bench/gpu.sh --dry-run` runs the same script on the CPU at tiny sizes.
# Extra arguments go to bench/gpu.py.
#
# Runs with the machine's own python3 (a GPU machine without network has torch, torchvision,
# h5py, click, scikit-learn, timm; no .venv, no package index): the project is installed into
# it in place, without dependencies and without build isolation, so nothing is downloaded.
# PYTHON=... picks another interpreter; without one, python3 if it has torch, else .venv's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if python3 -c "import torch" 2>/dev/null; then PY=python3; else PY=.venv/bin/python; fi
fi
if ! "$PY" -c "import importlib.metadata as m; m.version('frozen-feature-pipeline')" 2>/dev/null; then
  "$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
fi
if [[ " $* " != *" --dry-run "* ]]; then
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch (--dry-run runs on the CPU)'"
fi
exec "$PY" bench/gpu.py "$@"

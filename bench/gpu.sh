#!/usr/bin/env bash
# GPU extraction benchmark: fp32 / bf16 / fp16 autocast at 224 px, GPU memory, bf16/fp16 feature
# error against fp32. Under 5 minutes on one GPU. Extra arguments go to bench/gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
# Install only when the environment is missing: .ci/setup asks the package index every time,
# which an offline GPU machine cannot reach.
if ! .venv/bin/python -c "import torch, torchvision, h5py, sklearn, click, pipeline" 2>/dev/null; then
  bash .ci/setup
fi
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'"
.venv/bin/python bench/gpu.py "$@"

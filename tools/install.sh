#!/usr/bin/env bash
# Create .venv (once) and install what the project needs; safe to run again.
# TORCH_SPEC chooses the torch/torchvision build (default: the releases this project is tested with).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision, pycocotools, scipy, timm, ninja, pytest, xdist" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check $TORCH_SPEC
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt pytest pytest-xdist
fi
.venv/bin/python -c "import torch; print('torch', torch.__version__, '| CUDA available:', torch.cuda.is_available())"

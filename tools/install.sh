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
if ! .venv/bin/python -c "import torch, torchvision, pycocotools, scipy, timm, ninja, pytest" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check $TORCH_SPEC
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt pytest
fi
# optional: the ONNX export and onnxruntime inference (tools/export_onnx.py, tools/infer.py --onnx) and their tests,
# which are skipped without them; INSTALL_ONNX=0 leaves them out. ONNX_SPEC: the releases this project is tested with.
ONNX_SPEC=${ONNX_SPEC:-"onnx==1.23.2 onnxscript==0.7.2 onnx-ir==1.1.0 onnxruntime==1.32.0"}
if [ "${INSTALL_ONNX:-1}" != 0 ] && ! .venv/bin/python -c "import onnx, onnxscript, onnxruntime" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check $ONNX_SPEC
fi
.venv/bin/python -c "import torch; print('torch', torch.__version__, '| CUDA available:', torch.cuda.is_available())"

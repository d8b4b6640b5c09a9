#!/usr/bin/env bash
# Install (once) and run the test suite; extra arguments go to pytest (e.g. -k parity).
# The optional packages the tests exercise (ONNX export and onnxruntime, figures, TensorBoard, Segment Anything) are
# installed too; INSTALL_OPTIONAL=0 leaves them out (their tests then skip). OPTIONAL_SPEC: the releases this project
# is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
OPTIONAL_SPEC=${OPTIONAL_SPEC:-"onnx==1.23.2 onnxscript==0.7.2 onnx-ir==1.1.0 onnxruntime==1.32.0 matplotlib
               tensorboard segment-anything==1.0"}
OPTIONAL_IMPORTS="import onnx, onnxscript, onnxruntime, matplotlib, tensorboard, segment_anything"
if [ "${INSTALL_OPTIONAL:-1}" != 0 ] && ! .venv/bin/python -c "$OPTIONAL_IMPORTS" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check $OPTIONAL_SPEC
fi
.venv/bin/python -m pytest -q tests "$@"

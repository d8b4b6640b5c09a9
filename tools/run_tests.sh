#!/usr/bin/env bash
# Install (once) and run the test suite; extra arguments go to pytest (e.g. -k parity).
# The tests run in TEST_WORKERS processes (pytest-xdist; default: the CPU count, at most 4; 0: in this process).
# The optional packages the tests exercise (ONNX export and onnxruntime, figures, TensorBoard, Segment Anything) are
# installed too; INSTALL_OPTIONAL=0 leaves them out (their tests then skip). OPTIONAL_SPEC: the releases this project
# is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
# each test uses one thread (tests/conftest.py), so a process per core (2 cores: under 7 GiB in use); a
# module's tests go to one process, which makes its module-scoped fixtures once
WORKERS=${TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}
case "$WORKERS" in
    '' | *[!0-9]*) echo "TEST_WORKERS: expected a number of processes (0: none besides this one), got '$WORKERS'" >&2
                   exit 2 ;;
esac
# the training tests write checkpoints under the temporary folder, about 2.4 GiB at once at most (each test's folder
# goes when it passes): refuse to start where a full disk would fail them midway; TEST_MIN_FREE_MIB=0 skips this
TEMP_ROOT=${TMPDIR:-/tmp}
MIN_FREE_MIB=${TEST_MIN_FREE_MIB:-4096}
case "$MIN_FREE_MIB" in
    '' | *[!0-9]*) echo "TEST_MIN_FREE_MIB: expected a number of MiB (0: no check), got '$MIN_FREE_MIB'" >&2
                   exit 2 ;;
esac
FREE_MIB=$(df -Pm "$TEMP_ROOT" | awk 'NR == 2 {print $4}')
if [ "$MIN_FREE_MIB" -gt 0 ] && [ "${FREE_MIB:-0}" -lt "$MIN_FREE_MIB" ]; then
    echo "only ${FREE_MIB:-an unknown number of} MiB free in $TEMP_ROOT, the tests' temporary folder: they need" \
         "$MIN_FREE_MIB (set TMPDIR to another folder, or TEST_MIN_FREE_MIB)" >&2
    exit 1
fi
bash tools/install.sh
OPTIONAL_SPEC=${OPTIONAL_SPEC:-"onnx==1.23.2 onnxscript==0.7.2 onnx-ir==1.1.0 onnxruntime==1.32.0 matplotlib
               tensorboard segment-anything==1.0"}
OPTIONAL_IMPORTS="import onnx, onnxscript, onnxruntime, matplotlib, tensorboard, segment_anything"
if [ "${INSTALL_OPTIONAL:-1}" != 0 ] && ! .venv/bin/python -c "$OPTIONAL_IMPORTS" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check $OPTIONAL_SPEC
fi
# SAM 2 comes as source only, whose isolated build would pull another torch: built here without isolation or
# dependencies (its pure-Python ones listed); if that fails, only its test skips
SAM2_SPEC=${SAM2_SPEC:-"sam2==1.1.0 hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 iopath==0.1.10
           portalocker==4.4.2"}
if [ "${INSTALL_OPTIONAL:-1}" != 0 ] && ! .venv/bin/python -c "import sam2.build_sam" 2>/dev/null; then
    SAM2_BUILD_CUDA=0 .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
        --no-build-isolation $SAM2_SPEC || echo "sam2 was not installed: its test skips"
fi
if [ "$WORKERS" -gt 0 ]; then
    .venv/bin/python -m pytest -q -n "$WORKERS" --dist loadscope tests "$@"
else
    .venv/bin/python -m pytest -q tests "$@"
fi

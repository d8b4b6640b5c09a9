#!/usr/bin/env bash
# Every check that needs a GPU, in one command, with one report file (about 5 minutes on one H100, at most 9):
#   the compiled CUDA op built (JIT) and checked against the PyTorch path (models/ops/test.py: forward float64 /
#   float32, gradcheck of the three gradients), tests/test_ms_deform_attn_cuda.py (build, fp32 and fp16/bf16
#   kernels, autocast, dispatch), the op benchmark, and the full-size R50 H-Deformable-DETR (300 + 1500 queries)
#   at 800x1333, batch 2: a timed training step and evaluation forward, in float32 and with AMP (--use_fp16).
#
#   bash tools/gpu_check.sh [REPORT]     # default REPORT: $OUT/gpu_check_report.txt if $OUT is set, else ./
# Runs in the repository root; uses .venv/bin/python when it exists (PYTHON overrides). Exit status 1 when any
# step failed; the report ends with one line per step.
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT=${1:-${OUT:-.}/gpu_check_report.txt}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
case "$PY" in
    */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;;  # absolute: some steps run in models/ops
    *) PY=$(command -v "$PY") ;;
esac
CONFIG=configs/two_stage/deformable-detr-hybrid-branch/12eps/r50_hybrid_branch_lambda1_group6_t1500_dp0_mqs_lft_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.sh
mkdir -p "$(dirname "$REPORT")"
: > "$REPORT"
SUMMARY=()
FAILED=0

step() {  # step NAME TIMEOUT_S COMMAND...: run, append its output to the report, note its status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name" | tee -a "$REPORT"
    timeout "$limit" "$@" >> "$REPORT" 2>&1
    local status=$?
    [ $status -eq 0 ] || FAILED=1
    SUMMARY+=("$(printf '%-58s exit %3d  %4d s' "$name" "$status" $((SECONDS - start)))")
    echo "   exit $status after $((SECONDS - start)) s" | tee -a "$REPORT"
}

{
    echo "gpu_check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())"
} >> "$REPORT" 2>&1
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU is available here; run it on a GPU machine (report: $REPORT)" | tee -a "$REPORT"
    exit 2
fi

step "build the CUDA op (JIT, the visible GPU's architecture)" 300 \
    "$PY" -c "from models.ops.functions.extension import get_extension; m = get_extension(); print(m); assert m"
step "models/ops/test.py (op against the PyTorch path)" 120 bash -c "cd models/ops && '$PY' test.py"
step "models/ops/test.py --benchmark" 120 bash -c "cd models/ops && '$PY' test.py --benchmark"
step "pytest tests/test_ms_deform_attn_cuda.py" 300 "$PY" -m pytest -q tests/test_ms_deform_attn_cuda.py
step "pytest tests/test_equivalence.py (CUDA model test included)" 180 "$PY" -m pytest -q tests/test_equivalence.py
for precision in fp32 amp; do
    amp=()
    [ $precision = amp ] && amp=(--use_fp16)
    step "R50 hybrid train step 800x1333 x2, $precision" 150 \
        "$PY" tools/benchmark.py --train --config "$CONFIG" --image_size 800 1333 --batch_size 2 --num_iters 8 \
        --warm_iters 3 --device cuda "${amp[@]}"
    step "R50 hybrid eval forward 800x1333, $precision" 120 \
        "$PY" tools/benchmark.py --config "$CONFIG" --image_size 800 1333 --num_iters 30 --warm_iters 10 \
        --device cuda "${amp[@]}"
done

{
    echo
    echo "== summary"
    printf '%s\n' "${SUMMARY[@]}"
    grep -E "^(training step|input |Inference Speed|\* |all checks|SOME CHECKS|[0-9]+ passed|.* failed)" "$REPORT" \
        | sed 's/^/   /'
} >> "$REPORT"
sed -n '/^== summary/,$p' "$REPORT"
echo "report: $REPORT"
exit $FAILED

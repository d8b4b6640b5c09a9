#!/usr/bin/env bash
# Every check that needs a GPU, in one command within one time budget (8 minutes on a fresh GPU machine, the
# extension builds included), with one report file and one summary:
#   the environment; the small Python packages its steps import (scipy, timm, ninja, pytest: installed only when
#   missing, from .whl/ when that folder holds wheels, as on a machine without a network; torch and torchvision
#   never; no step evaluates AP, so pycocotools is not needed); the compiled CUDA and CPU ops built (JIT, the visible GPU's
#   architecture); the op's tests on CUDA (registration, kernels in fp64/fp32/fp16/bf16, autocast, dispatch);
#   the CUDA kernels against the CPU kernels; models/ops/test.py; the full-size R50 H-Deformable-DETR (300 + 1500
#   queries, 800x1333): a timed hybrid training step (batch 2) and evaluation forward (batch 1), with the compiled
#   op, in fp32, bf16 and fp16 (tools/benchmark.py --amp); the op benchmark.
#
#   bash tools/gpu_check.sh [REPORT]            # default REPORT: $OUT/gpu_check_report.txt if $OUT is set, else ./
#   bash tools/gpu_check.sh --smoke [REPORT]    # the same steps on the CPU with a tiny model, in under 5 minutes
#
# Each step may use what is left of the budget (GPU_CHECK_BUDGET seconds, default 480; --smoke 300) and is skipped
# once it is spent. Runs in the repository root; uses .venv/bin/python when it exists (PYTHON overrides). Exit
# status 0 when every step passed or was skipped for a stated reason, 1 when one failed or the budget ran out
# before it, 2 without a GPU (not --smoke).
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
if [ "${1:-}" = --smoke ]; then
    SMOKE=1
    shift
fi
REPORT=${1:-${OUT:-.}/gpu_check_report.txt}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
case "$PY" in
    */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;;  # absolute: some steps run in models/ops
    *) PY=$(command -v "$PY") ;;
esac
if [ $SMOKE = 1 ]; then
    BUDGET=${GPU_CHECK_BUDGET:-300}
else
    BUDGET=${GPU_CHECK_BUDGET:-480}
fi
DEADLINE=$((SECONDS + BUDGET))
CONFIG=configs/two_stage/deformable-detr-hybrid-branch/12eps/r50_hybrid_branch_lambda1_group6_t1500_dp0_mqs_lft_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.sh
mkdir -p "$(dirname "$REPORT")"
: > "$REPORT"
SUMMARY=()
FAILED=0

record() {  # record NAME STATUS SECONDS
    SUMMARY+=("$(printf '%-58s %-32s %4d s' "$1" "$2" "$3")")
}

step() {  # step NAME COMMAND...: run with what is left of the budget, append its output to the report
    local name=$1
    shift
    local start=$SECONDS left=$((DEADLINE - SECONDS))
    echo "== $name" | tee -a "$REPORT"
    if [ $left -lt 5 ]; then
        echo "   not run: the ${BUDGET} s budget is spent" | tee -a "$REPORT"
        record "$name" "NOT RUN (budget spent)" 0
        FAILED=1
        return
    fi
    timeout "$left" "$@" >> "$REPORT" 2>&1
    local status=$? verdict=ok
    if [ $status -eq 124 ]; then
        verdict="TIMEOUT (budget)"
        FAILED=1
    elif [ $status -ne 0 ]; then
        verdict="FAILED (exit $status)"
        FAILED=1
    fi
    echo "   $verdict after $((SECONDS - start)) s" | tee -a "$REPORT"
    record "$name" "$verdict" $((SECONDS - start))
}

skip() {  # skip NAME REASON
    echo "== $1" | tee -a "$REPORT"
    echo "   skipped: $2" | tee -a "$REPORT"
    record "$1" "SKIPPED ($2)" 0
}

{
    echo "gpu_check$([ $SMOKE = 1 ] && echo " --smoke") $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), budget ${BUDGET} s"
    "$PY" --version
    "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())"
    [ $SMOKE = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    command -v nvcc > /dev/null && nvcc --version | tail -1
} >> "$REPORT" 2>&1
if [ $SMOKE = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU is available here; run it on a GPU machine, or use --smoke (report: $REPORT)" \
        | tee -a "$REPORT"
    exit 2
fi

# the small packages the steps import (tests/test_gpu_check.py runs them with pycocotools hidden); torch and
# torchvision come with the machine and are never installed here
missing=()
for module in scipy timm ninja pytest; do
    "$PY" -c "import $module" 2> /dev/null || missing+=("$module")
done
if [ ${#missing[@]} -eq 0 ]; then
    skip "Python packages" "all present"
elif compgen -G ".whl/*.whl" > /dev/null; then  # carried wheels: a machine that reaches no index
    step "pip install ${missing[*]} from .whl/" "$PY" -m pip install --quiet --disable-pip-version-check \
        --no-index --find-links .whl "${missing[@]}"
else
    step "pip install ${missing[*]}" "$PY" -m pip install --quiet --disable-pip-version-check --retries 1 \
        --timeout 20 "${missing[@]}"
fi

if [ $SMOKE = 1 ]; then
    DEVICE=cpu
    MODEL=(--config "$CONFIG" --device cpu --backbone resnet18 --no_pretrained_backbone --num_feature_levels 2
           --enc_layers 1 --dec_layers 1 --hidden_dim 32 --nheads 4 --dim_feedforward 64 --enc_n_points 2
           --dec_n_points 2 --num_queries_one2one 10 --num_queries_one2many 20 --k_one2many 2 --topk 20)
    TRAIN=(--image_size 64 96 --image_size 96 64 --num_iters 2 --warm_iters 1)
    EVAL=(--image_size 96 128 --num_iters 2 --warm_iters 1)
    step "build the CPU op (JIT)" "$PY" -c \
        "from models.ops.functions.extension import get_cpu_extension as g; m = g(); print(m); assert m"
else
    DEVICE=cuda
    MODEL=(--config "$CONFIG" --device cuda --no_pretrained_backbone)
    TRAIN=(--image_size 800 1333 --batch_size 2 --num_iters 8 --warm_iters 3)
    EVAL=(--image_size 800 1333 --num_iters 30 --warm_iters 10)
    # both ops at once: ninja builds each with every core, the CUDA one is the longer
    step "build the CUDA op and the CPU op (JIT)" "$PY" -c "
from concurrent.futures import ThreadPoolExecutor
from models.ops.functions.extension import get_cpu_extension, get_extension
with ThreadPoolExecutor(2) as pool:
    cuda, cpu = pool.submit(get_extension), pool.submit(get_cpu_extension)
    print(cuda.result(), cpu.result())
    assert cuda.result() and cpu.result()"
fi

# the nvcc build test builds another copy for one fixed architecture: the step above has built the op already
step "op tests (registration, kernels, autocast, dispatch)" "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_ms_deform_attn_op.py tests/test_ms_deform_attn_cuda.py tests/test_ms_deform_attn_autocast.py \
    -k "not nvcc_build"
step "kernel parity: CUDA vs CPU (--smoke: CPU vs PyTorch)" "$PY" -m pytest -q \
    -p no:cacheprovider tests/test_ms_deform_attn_cuda.py tests/test_ms_deform_attn_op.py \
    -k "cuda_kernels_match_the_cpu_kernels or op_equals_the_pytorch_path"
if [ $SMOKE = 0 ]; then
    step "models/ops/test.py (op vs the PyTorch path, gradcheck)" bash -c "cd models/ops && '$PY' test.py"
fi

# --amp {fp32,bf16,fp16} of tools/benchmark.py (main.py's parser); a tree without it has only --use_fp16 (CUDA)
if "$PY" -c "import sys; from main import get_args_parser; get_args_parser().parse_args(['--amp', 'bf16'])" \
        > /dev/null 2>&1; then
    HAS_AMP=1
else
    HAS_AMP=0
fi
for precision in fp32 bf16 fp16; do
    amp=(--amp "$precision")
    if [ $HAS_AMP = 0 ]; then
        if [ $precision = fp32 ]; then
            amp=()
        elif [ $precision = fp16 ] && [ $DEVICE = cuda ]; then
            amp=(--use_fp16)
        else
            skip "hybrid training step, $precision" "no --amp in this tree"
            skip "evaluation forward, $precision" "no --amp in this tree"
            continue
        fi
    fi
    step "hybrid training step, $precision" "$PY" tools/benchmark.py --train "${MODEL[@]}" "${TRAIN[@]}" "${amp[@]}"
    step "evaluation forward, $precision" "$PY" tools/benchmark.py "${MODEL[@]}" "${EVAL[@]}" "${amp[@]}"
done
if [ $SMOKE = 0 ]; then
    step "models/ops/test.py --benchmark" bash -c "cd models/ops && '$PY' test.py --benchmark"
fi

{
    echo
    echo "== summary (${SECONDS} s of ${BUDGET} s)"
    printf '%s\n' "${SUMMARY[@]}"
    grep -E "^(training step|input |Inference Speed|\* |all checks|SOME CHECKS|[0-9]+ (passed|failed)|.* failed)" \
        "$REPORT" | sed 's/^/   /'
} >> "$REPORT"
sed -n '/^== summary/,$p' "$REPORT"
echo "report: $REPORT"
exit $FAILED

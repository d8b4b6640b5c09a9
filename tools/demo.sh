#!/usr/bin/env bash
# Quick start: install (once), make the synthetic shapes dataset, train the demo model on the CPU, then evaluate
# the saved checkpoint with --eval --resume. Downloads no weights and no data. Extra arguments go to main.py
# (all but --output_dir, --resume and --eval, which the demo sets).
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/reserved_flags.sh
for arg in "$@"; do refuse_reserved demo.sh "$arg" output_dir resume eval; done
bash tools/install.sh
export PATH="$PWD/.venv/bin:$PATH"   # the config runs `python`

CONFIG=configs/demo/r18_synthetic_hybrid_two_stage.sh
EXP_DIR=exps/demo/r18_synthetic_hybrid_two_stage
start=$(date +%s)

python tools/make_synthetic_coco.py --out data/synthetic --num_train 800 --num_val 100 --seed 0

rm -f "$EXP_DIR"/log*.txt "$EXP_DIR"/checkpoint*.pth   # the demo starts anew each time
bash "$CONFIG" "$@"
trained=$(date +%s)

echo "== evaluating $EXP_DIR/checkpoint.pth =="
bash "$CONFIG" "$@" --eval --resume "$EXP_DIR/checkpoint.pth" 2>&1 | grep -v "^+ "
echo "== demo wall time: training $((trained - start)) s, total $(( $(date +%s) - start )) s =="

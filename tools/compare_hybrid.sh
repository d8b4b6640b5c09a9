#!/usr/bin/env bash
# Hybrid matching against one-to-one matching on the synthetic demo: the demo config trained with its hybrid branch
# ("hybrid") and with the branch off ("one2one": --num_queries_one2many 0; the same 30 one-to-one queries, data,
# seeds and schedule), each evaluated after every epoch; then a table (mean ± std over seeds) and a figure (COCO AP
# and AP50 against epochs and against training time). Installs (once) and makes the dataset as tools/demo.sh does.
#
#   bash tools/compare_hybrid.sh                          # one seed of each
#   bash tools/compare_hybrid.sh --seeds 3                # seeds 0, 1, 2 of each
#   bash tools/compare_hybrid.sh --seeds 3 --epochs 24 --num_queries_one2many 240 --k_one2many 6
#
# Options: --seeds N (seeds 0..N-1, default 1), --num_train N and --num_val N (synthetic images, default 800 and
# 100, as the demo), --out DIR (default exps/demo/compare), --dry_run (print the runs' commands, run nothing).
# Every other argument goes to main.py in both runs (the one2one run then gets --num_queries_one2many 0 after
# them). Runs land in DIR/<hybrid|one2one>_seed<S> (log.txt, console.txt, wall_time.txt: the seconds of the whole
# main.py process), the table in DIR/table.txt, the figure in DIR.png; earlier runs in DIR are deleted first.
# python tools/compare_hybrid.py DIR redraws the table and the figure. About 19 min with the defaults on an idle
# 2-core CPU; on a busy machine, OMP_NUM_THREADS=1 bash tools/compare_hybrid.sh ... is much faster.
set -euo pipefail
cd "$(dirname "$0")/.."

SEEDS=1
NUM_TRAIN=800
NUM_VAL=100
OUT=exps/demo/compare
DRY_RUN=0
EXTRA=()
. tools/reserved_flags.sh
die() { echo "compare_hybrid.sh: $*" >&2; exit 2; }
positive() { [[ $2 =~ ^[0-9]+$ ]] && (( 10#$2 > 0 )) || die "$1 must be a whole number > 0, got '$2'"; }
while [ $# -gt 0 ]; do
    case $1 in
        --seeds=* | --num_train=* | --num_val=* | --out=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
        --seeds | --num_train | --num_val | --out) [ $# -ge 2 ] || die "$1 needs a value" ;;
        -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { print substr($0, 3) }' "$0"; exit 0 ;;
    esac
    case $1 in
        --seeds) positive "$1" "$2"; SEEDS=$((10#$2)); shift 2 ;;
        --num_train) positive "$1" "$2"; NUM_TRAIN=$((10#$2)); shift 2 ;;
        --num_val) positive "$1" "$2"; NUM_VAL=$((10#$2)); shift 2 ;;
        --out) OUT=${2%/}; shift 2 ;;
        --dry_run) DRY_RUN=1; shift ;;
        *) refuse_reserved compare_hybrid.sh "$1" seed output_dir coco_path  # use --seeds, --out, --num_train/--num_val
           EXTRA+=("$1"); shift ;;
    esac
done

CONFIG=configs/demo/r18_synthetic_hybrid_two_stage.sh
DATA=data/synthetic   # the demo's dataset; other sizes get their own folder
if [ "$NUM_TRAIN/$NUM_VAL" != 800/100 ]; then
    DATA=data/synthetic_${NUM_TRAIN}_${NUM_VAL}
fi
# the command of one run: variant, seed
run_command() {
    local branch=()
    if [ "$1" = one2one ]; then branch=(--num_queries_one2many 0); fi
    RUN=(bash "$CONFIG" --coco_path "$DATA" --output_dir "$OUT/${1}_seed$2" --seed "$2" ${EXTRA[@]+"${EXTRA[@]}"}
         ${branch[@]+"${branch[@]}"})
}
if [ "$DRY_RUN" = 1 ]; then
    for ((seed = 0; seed < SEEDS; seed++)); do
        for variant in hybrid one2one; do run_command "$variant" "$seed"; echo "${RUN[*]}"; done
    done
    exit 0
fi

bash tools/install.sh
export PATH="$PWD/.venv/bin:$PATH"   # the config runs `python`
python tools/make_synthetic_coco.py --out "$DATA" --num_train "$NUM_TRAIN" --num_val "$NUM_VAL" --seed 0

mkdir -p "$OUT"
rm -rf "$OUT"/*_seed[0-9]*/ "$OUT/table.txt"
start=$(date +%s)
for ((seed = 0; seed < SEEDS; seed++)); do
    for variant in hybrid one2one; do
        run_dir=$OUT/${variant}_seed$seed
        run_command "$variant" "$seed"
        mkdir -p "$run_dir"
        echo "== $variant, seed $seed: $run_dir (all its output in $run_dir/console.txt) =="
        run_start=$EPOCHREALTIME
        if ! "${RUN[@]}" 2>&1 | tee "$run_dir/console.txt" | grep --line-buffered -E "^(Epoch [0-9]+ averages|bbox AP)"
        then
            tail -n 20 "$run_dir/console.txt" >&2
            die "the $variant run (seed $seed) failed: see $run_dir/console.txt"
        fi
        awk -v a="$run_start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f\n", b - a }' > "$run_dir/wall_time.txt"
        echo "== $variant, seed $seed: $(cat "$run_dir/wall_time.txt") s =="
    done
done

python tools/compare_hybrid.py "$OUT" | tee "$OUT/table.txt"
echo "== comparison wall time: $(( $(date +%s) - start )) s for $SEEDS seed(s) of each =="

#!/usr/bin/env bash
# Run a config on a SLURM partition, one task per GPU:
#   [GPUS_PER_NODE=..] [CPUS_PER_TASK=..] [SRUN_ARGS=..] tools/run_dist_slurm.sh PARTITION JOB_NAME GPUS CONFIG [ARGS...]
# Each task runs CONFIG; main.py turns SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_NODELIST into its rank,
# world size, local device and master address (util/misc.py, init_distributed_mode).

if [ $# -lt 4 ]; then
    echo "usage: $0 PARTITION JOB_NAME GPUS CONFIG [ARGS...]" >&2
    echo "  env: GPUS_PER_NODE (default min(GPUS, 8)), CPUS_PER_TASK (4), SRUN_ARGS (extra srun options)" >&2
    exit 2
fi

PARTITION=$1
JOB_NAME=$2
GPUS=$3
CONFIG=$4
shift 4

. "$(dirname "${BASH_SOURCE[0]}")/gpu_counts.sh" "$0"
CPUS_PER_TASK=${CPUS_PER_TASK:-4}
SRUN_ARGS=${SRUN_ARGS:-""}

set -x
# SRUN_ARGS is left unquoted on purpose: it holds several srun options.
exec srun -p "$PARTITION" \
    --job-name="$JOB_NAME" \
    --gres=gpu:"$GPUS_PER_NODE" \
    --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" \
    --cpus-per-task="$CPUS_PER_TASK" \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS} \
    "$CONFIG" "$@"

#!/usr/bin/env bash
# Run a config on a SLURM partition, one task per GPU:
#   [GPUS_PER_NODE=..] [CPUS_PER_TASK=..] [SRUN_ARGS=..] tools/run_dist_slurm.sh PARTITION JOB_NAME GPUS CONFIG [ARGS...]
# Each task runs CONFIG; main.py turns SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_NODELIST into its rank,
# world size, local device and master address (util/misc.py, init_distributed_mode).
#
# Preemptible / requeued jobs: pass --auto_resume (and e.g. --save_every_iters 1000) to the config, and let SLURM
# signal the job before it ends it, e.g. SRUN_ARGS="--requeue --signal=TERM@120" (or sbatch --requeue
# --signal=B:USR1@120 with a script that forwards the signal to this srun). On SIGTERM or SIGUSR1 every task
# finishes its iteration, checkpoint.pth is saved and main.py exits with 128 + the signal's number; the requeued
# job then continues from that iteration exactly.

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
. "$(dirname "${BASH_SOURCE[0]}")/config_script_check.sh" "$0"

set -x
# SRUN_ARGS is left unquoted on purpose: it holds several srun options, split into words but not expanded as file
# patterns (set -f): a host list such as node[01-04] reaches srun as written
set -f
exec srun -p "$PARTITION" \
    --job-name="$JOB_NAME" \
    --gres=gpu:"$GPUS_PER_NODE" \
    --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" \
    --cpus-per-task="$CPUS_PER_TASK" \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS} \
    "$CONFIG" "$@"

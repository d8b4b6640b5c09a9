#!/usr/bin/env bash
# Start one node's share of a distributed run with torchrun:
#   [GPUS_PER_NODE=..] [MASTER_ADDR=..] [MASTER_PORT=..] [NODE_RANK=..] [MAX_RESTARTS=..] \
#       tools/run_dist_launch.sh GPUS CONFIG [ARGS...]
# GPUS is the total over all nodes; every node runs the same command with its own NODE_RANK.
# MAX_RESTARTS (default 0): times torchrun restarts the workers after one fails; with --auto_resume (and
# --save_every_iters N) in ARGS the restarted run continues from its last checkpoint (docs/distributed.md).
# torchrun starts GPUS_PER_NODE copies of CONFIG (a script run as is) with RANK, WORLD_SIZE, LOCAL_RANK,
# LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; ARGS go on to main.py.

if [ $# -lt 2 ]; then
    echo "usage: $0 GPUS CONFIG [ARGS...]" >&2
    echo "  env: GPUS_PER_NODE (default min(GPUS, 8)), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), NODE_RANK (0)," >&2
    echo "       MAX_RESTARTS (0)" >&2
    exit 2
fi

GPUS=$1
CONFIG=$2
shift 2

. "$(dirname "${BASH_SOURCE[0]}")/gpu_counts.sh" "$0"
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NODE_RANK=${NODE_RANK:-0}
MAX_RESTARTS=${MAX_RESTARTS:-0}
# torchrun waits for a node rank it will never see (out of range): no message, a hang
if ! [[ $NODE_RANK =~ ^[0-9]+$ ]] || [ $((10#$NODE_RANK)) -ge "$NNODES" ]; then
    echo "$0: NODE_RANK must be 0 to $((NNODES - 1)) for $NNODES node(s) of $GPUS_PER_NODE GPUs, got '$NODE_RANK'" >&2
    exit 2
fi
NODE_RANK=$((10#$NODE_RANK))
. "$(dirname "${BASH_SOURCE[0]}")/config_script_check.sh" "$0"
# torchrun looks a name without a slash up on PATH, not in the current folder: run the file just checked
case $CONFIG in
    */*) ;;
    *) CONFIG=./$CONFIG ;;
esac

set -x
exec ${PYTHON:-python} -m torch.distributed.run \
    --nnodes "$NNODES" \
    --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --max-restarts "$MAX_RESTARTS" \
    --no-python \
    "$CONFIG" "$@"

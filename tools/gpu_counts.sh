# Sourced by the launchers: checks GPUS (the total) and sets GPUS_PER_NODE (default min(GPUS, 8)).
# Exits with status 2 and a message naming the launcher ($1) on bad values.

_gpu_counts_fail() {
    echo "$1: $2" >&2
    exit 2
}

case "$GPUS" in
    ''|*[!0-9]*|0) _gpu_counts_fail "$1" "GPUS must be a positive integer, got '$GPUS'" ;;
esac
if [ "$GPUS" -lt 8 ]; then
    GPUS_PER_NODE=${GPUS_PER_NODE:-$GPUS}
else
    GPUS_PER_NODE=${GPUS_PER_NODE:-8}
fi
case "$GPUS_PER_NODE" in
    ''|*[!0-9]*|0) _gpu_counts_fail "$1" "GPUS_PER_NODE must be a positive integer, got '$GPUS_PER_NODE'" ;;
esac

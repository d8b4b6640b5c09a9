# Sourced by the launchers: checks GPUS (the total) and sets GPUS_PER_NODE (default min(GPUS, 8)), both rewritten
# as plain decimal numbers ("08" becomes 8: in $(( )) a leading zero would mean octal), GPUS a multiple of
# GPUS_PER_NODE, and sets NNODES.
# Exits with status 2 and a message naming the launcher ($1) on bad values.

_gpu_counts_fail() {
    echo "$1: $2" >&2
    exit 2
}

# $1: launcher, $2: name of the variable, which must hold a positive integer; it is rewritten without leading zeros
_gpu_counts_positive() {
    local value=${!2} number=${!2}
    case "$value" in
        ''|*[!0-9]*) _gpu_counts_fail "$1" "$2 must be a positive integer, got '$value'" ;;
    esac
    while [ "${number:0:1}" = 0 ]; do number=${number:1}; done
    if [ -z "$number" ]; then
        _gpu_counts_fail "$1" "$2 must be a positive integer, got '$value'"
    elif [ "${#number}" -gt 9 ]; then
        _gpu_counts_fail "$1" "$2 is too large, got '$value'"
    fi
    printf -v "$2" '%s' "$number"
}

_gpu_counts_positive "$1" GPUS
if [ "$GPUS" -lt 8 ]; then
    GPUS_PER_NODE=${GPUS_PER_NODE:-$GPUS}
else
    GPUS_PER_NODE=${GPUS_PER_NODE:-8}
fi
_gpu_counts_positive "$1" GPUS_PER_NODE
if [ $((GPUS % GPUS_PER_NODE)) -ne 0 ]; then
    _gpu_counts_fail "$1" "GPUS ($GPUS) must be a multiple of GPUS_PER_NODE ($GPUS_PER_NODE)"
fi
NNODES=$((GPUS / GPUS_PER_NODE))

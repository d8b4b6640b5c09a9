# Sourced by tools/demo.sh and tools/compare_hybrid.sh: refuse_reserved SCRIPT ARG NAME... exits with status 2 when
# ARG is the main.py flag --NAME (also as --NAME=VALUE) or an abbreviation of it, which main.py's parser would
# take for --NAME (argparse accepts any unambiguous prefix), for a NAME the script sets itself.
refuse_reserved() {
    local script=$1 arg=$2 name
    shift 2
    case $arg in --?*) ;; *) return 0 ;; esac
    name=${arg%%=*}
    name=${name#--}
    for flag in "$@"; do
        if [[ $flag == "$name"* ]]; then
            if [ "$name" = "$flag" ]; then
                echo "$script: $arg is set by this script" >&2
            else
                echo "$script: $arg abbreviates --$flag, which this script sets" >&2
            fi
            exit 2
        fi
    done
}

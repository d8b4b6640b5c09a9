# Sourced by the launchers after setting CONFIG: torchrun --no-python and srun run it as a program, and a missing,
# non-file or non-executable path failed in every process with a traceback. Exits with status 2 and one line
# naming the launcher ($1) and the path when it cannot run.

if [ ! -e "$CONFIG" ]; then
    _config_where=
    [ "${CONFIG:0:1}" = / ] || _config_where=" (a relative path, from $PWD)"
    echo "$1: config script '$CONFIG' does not exist${_config_where}; check the path" >&2
    exit 2
elif [ ! -f "$CONFIG" ]; then
    echo "$1: config script '$CONFIG' is not a regular file; give the script itself, e.g. configs/<config>.sh" >&2
    exit 2
elif [ ! -x "$CONFIG" ]; then
    echo "$1: config script '$CONFIG' is not executable; run: chmod +x $(printf %q "$CONFIG")" >&2
    exit 2
fi

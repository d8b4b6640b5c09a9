"""Read the main.py flags out of a config script (configs/**/*.sh), for tools that take a config."""
import copy
import re
import shlex
from pathlib import Path


def read_config_script(path):
    """(EXP_DIR, the main.py flags with ${EXP_DIR} substituted) of a config script, read from its text.

    The scripts set EXP_DIR and PY_ARGS=("$@"), then run `python -u main.py <flags> "${PY_ARGS[@]}"`, with line
    continuations (upstream's unquoted `${PY_ARGS}` ending is read too).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config script at {path}")
    text = path.read_text().replace("\\\n", " ")
    exp_dir = re.search(r"^EXP_DIR=(\S+)\s*$", text, re.M)
    command = re.search(r"^python -u main\.py (.*)$", text, re.M)
    if exp_dir is None or command is None:
        raise ValueError(f"{path} is not a config script (it needs an EXP_DIR= line and a `python -u main.py` "
                         "command)")
    words = shlex.split(command.group(1))
    if not words or words[-1] not in ("${PY_ARGS[@]}", "${PY_ARGS}"):
        raise ValueError(f"{path}: the main.py command must end with \"${{PY_ARGS[@]}}\" (the script's arguments)")
    return exp_dir.group(1), [w.replace("${EXP_DIR}", exp_dir.group(1)) for w in words[:-1]]


def main_arguments(parser, flags, config=None, saved=None):
    """main.py arguments from `parser`: the config script's flags (when `config` is given), else the arguments
    saved in a checkpoint (`saved`, a Namespace; names the parser does not know are left out, names it knows but
    `saved` lacks keep their defaults), then `flags` on top of either."""
    base = parser.parse_args(read_config_script(config)[1] if config else [])
    if saved is not None and not config:
        for name, value in vars(saved).items():
            if hasattr(base, name):
                setattr(base, name, copy.deepcopy(value))
    return parser.parse_args(flags, namespace=base)

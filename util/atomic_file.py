"""New files written beside their destination and renamed onto it, so that a kill mid-write never leaves half a
file under the destination's name."""
import os
import secrets
from pathlib import Path


def temporary_beside(path):
    """(file descriptor open for binary writing, its path) of a new hidden file .<name>.<random>.tmp in the folder of
    `path`, for os.replace onto `path` once written. It is created as every new file is (0666 less the umask), not
    0600 as tempfile.mkstemp would make it."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # that random name is taken: draw another
            continue

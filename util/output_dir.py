"""--output_dir checked before anything else runs: created when missing, and proven writable."""
import errno
import os
import tempfile
from pathlib import Path


def check_output_dir(output_dir):
    """Create output_dir (and its parents) when missing and write a probe file in it, so that a path that cannot
    hold checkpoints and logs fails now, not after an epoch; returns the Path (None for an empty flag). The errors
    are the OSError subclass of the cause (PermissionError, NotADirectoryError, ...), naming the path and reason."""
    if not output_dir:
        return None
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--output_dir {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = f"{error.strerror}: {error.filename}" if error.strerror and error.filename else error
        raise type(error)(f"--output_dir {path}: cannot create it ({reason})") from None
    try:
        # named like a killed save's temporary file (.NAME.RANDOM.tmp): the main process removes those at the
        # start (maybe another process's probe, hence missing_ok), and so does a resumed run after a kill
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_probe.", suffix=".tmp")
        os.close(fd)
        Path(probe).unlink(missing_ok=True)
    except OSError as error:
        permissions = f"; {_owner_and_mode(path)}" if error.errno in (errno.EACCES, errno.EPERM) else ""
        raise type(error)(f"--output_dir {path}: cannot write in it ({error.strerror or error}{permissions})") \
            from None
    return path


def _owner_and_mode(path):
    """'mode 0o555, owner uid 1000; this process runs as uid 1001' (what a permission error hinges on)."""
    info = path.stat()
    return f"mode {oct(info.st_mode & 0o777)}, owner uid {info.st_uid}; this process runs as uid {os.geteuid()}"

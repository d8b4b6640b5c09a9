"""--output_dir checked before anything else runs: created when missing, and proven writable; the tools' --out
checked the same way without creating anything (check_output_path)."""
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


def check_output_path(path, flag, directory):
    """Before the work whose result goes to `path` (`directory`: a folder created when missing, else a file): check,
    creating nothing, that it is of that kind or missing and that this process may write where it goes (the path
    itself when it exists, else its nearest existing folder). Raises the OSError subclass of the problem
    (NotADirectoryError, IsADirectoryError, PermissionError), naming `flag`, the path and the reason."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{flag} {path} exists and is not a directory")
    if not directory and path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a directory, not a file to write")
    folder = path if directory else path.parent
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {existing} is not a directory")
    targets = [existing] + ([path] if not directory and path.exists() else [])
    for target in targets:
        mode = os.W_OK | (os.X_OK if target.is_dir() else 0)
        if not os.access(target, mode, effective_ids=os.access in os.supports_effective_ids):
            raise PermissionError(f"{flag} {path}: cannot write in {target} ({_not_writable(target)})")


def _not_writable(path):
    """Why `path` denies writing: a read-only file system, or its permission bits (see _owner_and_mode)."""
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        return "read-only file system"
    return _owner_and_mode(path)

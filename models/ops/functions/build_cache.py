"""Where the JIT builds of the compiled ops live: one directory per build key, a hash of the sources and of what
else decides the binary (torch and CUDA versions, the Python ABI, compiler and flags, CUDA architectures).

Two checkouts with the same sources share one build; checkouts with other sources (or another torch) get their
own, instead of rebuilding each other's in turn. The sources are built from a copy in the build directory, so the
build's commands (which name the source paths) are the same whichever checkout asks for it. One process builds in
a directory at a time (exclusive_build), under a lock the kernel drops when its holder dies.
"""
import contextlib
import hashlib
import os
import shutil
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

import filelock
import torch

KEY_LENGTH = 16  # hex digits
BUILD_FILE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")


def source_files(source_dir):
    """The files a build may read, relative to source_dir, sorted: every C++ / CUDA source and header under it."""
    source_dir = Path(source_dir)
    return sorted(p.relative_to(source_dir) for p in source_dir.rglob("*")
                  if p.is_file() and p.suffix in BUILD_FILE_SUFFIXES)


def build_key(source_dir, flags, cuda_arch_list=None):
    """Hex digest of the files of source_dir (names and contents), `flags` (every flag of the build), the CUDA
    architectures, torch's and CUDA's versions, the Python ABI and the C++ compiler ($CXX)."""
    digest = hashlib.sha256()

    def add(text):
        digest.update(text.encode())
        digest.update(b"\0")

    for relative in source_files(source_dir):
        add(relative.as_posix())
        digest.update((Path(source_dir) / relative).read_bytes())
    for item in (*flags, f"arch={cuda_arch_list}", f"torch={torch.__version__}", f"cuda={torch.version.cuda}",
                 f"python={sysconfig.get_config_var('SOABI') or sys.version}", f"cxx={os.environ.get('CXX', 'c++')}"):
        add(str(item))
    return digest.hexdigest()[:KEY_LENGTH]


def extensions_root():
    """$TORCH_EXTENSIONS_DIR, else torch's default root for JIT builds (~/.cache/torch_extensions)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def staged_sources(source_dir, build_directory):
    """build_directory/src: a copy of source_dir's build files, written once (atomically: a finished copy is never
    seen half-written by another process) and then reused as it is, its contents being those of the key."""
    staged = Path(build_directory) / "src"
    if staged.is_dir():
        return staged
    Path(build_directory).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="src.", dir=build_directory))
    for relative in source_files(source_dir):
        (scratch / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(source_dir) / relative, scratch / relative)
    try:
        scratch.rename(staged)
    except OSError:  # another process staged it first: the same files
        shutil.rmtree(scratch, ignore_errors=True)
    return staged


BUILD_LOCK = "build.lock"  # ours: an OS lock (flock), released by the kernel when its holder dies
TORCH_LOCK = "lock"  # cpp_extension's: torch 2.4-2.11 waits while this file exists, 2.14 flocks it


def torch_waits_on_lock_file():
    """True when this torch's cpp_extension takes the build directory's lock by creating the file `lock` and
    waits, without limit, while that file exists (FileBaton: torch 2.4-2.11, not 2.14): a killed build leaves it."""
    from torch.utils import cpp_extension

    return hasattr(cpp_extension, "FileBaton")


@contextlib.contextmanager
def exclusive_build(build_directory, name):
    """Hold build_directory's build lock (waiting while another process builds there); with a torch that waits on
    a lock file, remove one that no live build holds, so that a build killed midway (Ctrl-C, a job's time limit,
    out of memory) does not make every later run wait for ever. Every build of the ops goes through here."""
    directory = Path(build_directory)
    directory.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(directory / BUILD_LOCK):
        stale = directory / TORCH_LOCK
        if torch_waits_on_lock_file() and stale.exists():
            stale.unlink(missing_ok=True)
            warnings.warn(f"{name}: removed {stale}, left by a build that was interrupted (this torch would have "
                          "waited for it for ever); building again", RuntimeWarning, stacklevel=3)
        yield directory

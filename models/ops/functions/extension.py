"""Loading of the compiled MultiScaleDeformableAttention ops (CUDA, and CPU): prebuilt import, else JIT build (in a
directory of its build key, build_cache.py), else None (the PyTorch path)."""
import importlib
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path

import torch

from . import build_cache

EXTENSION_NAME = "MultiScaleDeformableAttention"  # the CUDA op
CPU_EXTENSION_NAME = "MultiScaleDeformableAttentionCPU"
SOURCE_DIR = Path(__file__).resolve().parents[1] / "src"
CPU_FLAGS = ["-O3", "-fopenmp"]  # OpenMP: at::parallel_for and the vectorised channel loops
# used when neither TORCH_CUDA_ARCH_LIST nor a visible GPU says which architectures to build for
DEFAULT_ARCH_LIST = "7.5;8.0;8.6;9.0+PTX"
NVCC_FLAGS = ["-O3"]

_lock = threading.Lock()
_state = {"tried": False, "module": None}  # the CUDA op
_cpu_state = {"tried": False, "module": None}


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its "No CUDA runtime is found" warning, which says nothing here:
    the CUDA toolkit is looked for by find_cuda_home(), and the CPU op needs none."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def extension_sources(source_dir=SOURCE_DIR):
    """The C++ and CUDA source files of the CUDA op, as strings."""
    return [str(Path(source_dir) / "binding.cpp"), str(Path(source_dir) / "cuda" / "ms_deform_attn_cuda.cu")]


def cpu_extension_sources(source_dir=SOURCE_DIR):
    """The C++ source files of the CPU op, as strings."""
    return [str(Path(source_dir) / "cpu" / "ms_deform_attn_cpu.cpp")]


def _keyed_build(name, source_dir, flags, build_directory, cuda_arch_list=None):
    """(module name, build directory, staged source directory) of a JIT build: the name carries the build key, the
    directory defaults to <extensions root>/<that name>."""
    keyed_name = f"{name}_{build_cache.build_key(source_dir, flags, cuda_arch_list)}"
    directory = Path(build_directory) if build_directory is not None else build_cache.extensions_root() / keyed_name
    return keyed_name, directory, build_cache.staged_sources(source_dir, directory)


def _visible_arch_list():
    """The visible GPUs' architectures ("8.0;9.0"), the ones cpp_extension builds for without TORCH_CUDA_ARCH_LIST."""
    capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in capabilities)


def find_cuda_home():
    """A CUDA toolkit root holding bin/nvcc and include/cuda_runtime.h, or None.

    Tries $CUDA_HOME, $CUDA_PATH, torch's own guess, the resolved nvcc on PATH and /usr/local/cuda: torch
    guesses the parent of `which nvcc`, which is wrong when nvcc is a wrapper script in /usr/local/bin.
    """
    cpp_extension = _cpp_extension()

    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None, "/usr/local/cuda"]
    for root in filter(None, candidates):
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def configure_cuda_home():
    """Point torch.utils.cpp_extension at find_cuda_home(); returns it (None when there is no toolkit)."""
    cpp_extension = _cpp_extension()

    root = find_cuda_home()
    if root is not None:
        cpp_extension.CUDA_HOME = root  # read at build time by the include, library and nvcc paths
    return root


def load_extension(verbose=False, arch_list=None, build_directory=None, source_dir=SOURCE_DIR):
    """Compile (or reuse the cached build of) the op with ninja and import it; raises on failure.

    arch_list: e.g. "8.0" or "8.0;9.0+PTX"; default TORCH_CUDA_ARCH_LIST, else the visible GPUs, else
    DEFAULT_ARCH_LIST, so this also works on a machine without a GPU. build_directory: default
    <$TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions>/MultiScaleDeformableAttention_<build key>; ninja
    rebuilds only what changed. Needs nvcc and ninja, not a GPU.
    """
    cpp_extension = _cpp_extension()

    if configure_cuda_home() is None:
        raise OSError("no CUDA toolkit found: set CUDA_HOME to the directory holding bin/nvcc")
    if arch_list is None and not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        arch_list = DEFAULT_ARCH_LIST
    effective_arch_list = arch_list or os.environ.get("TORCH_CUDA_ARCH_LIST") or _visible_arch_list()
    flags = ["cflags", "-O3", "cuda_cflags", *NVCC_FLAGS]
    name, directory, staged = _keyed_build(EXTENSION_NAME, source_dir, flags, build_directory, effective_arch_list)
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # read by cpp_extension when it writes the nvcc flags
    try:
        with build_cache.exclusive_build(directory, name):
            return cpp_extension.load(
                name=name, sources=extension_sources(staged), extra_cflags=["-O3"], extra_cuda_cflags=NVCC_FLAGS,
                build_directory=str(directory), verbose=verbose)
    finally:
        if arch_list is not None:
            if previous is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = previous


def cpu_build(source_dir=SOURCE_DIR, build_directory=None):
    """(module name, build directory, staged sources) of the CPU op's JIT build."""
    return _keyed_build(CPU_EXTENSION_NAME, source_dir, ["cflags", *CPU_FLAGS, "ldflags", "-fopenmp"], build_directory)


def load_cpu_extension(verbose=False, build_directory=None, source_dir=SOURCE_DIR):
    """Compile (or reuse the cached build of) the CPU op with ninja and a C++ compiler, and import it; raises on
    failure. build_directory: default <$TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions>/
    MultiScaleDeformableAttentionCPU_<build key>; about half a minute the first time."""
    cpp_extension = _cpp_extension()

    name, directory, staged = cpu_build(source_dir, build_directory)
    with build_cache.exclusive_build(directory, name):
        return cpp_extension.load(
            name=name, sources=cpu_extension_sources(staged), extra_cflags=CPU_FLAGS, extra_ldflags=["-fopenmp"],
            build_directory=str(directory), verbose=verbose)


def _import_prebuilt(name=EXTENSION_NAME):
    """The module installed by `python setup.py install`, or None."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _summary(error, width=200):
    """One line about a build failure: its first line and the first compiler error, if any."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    head = lines[0].split(": [")[0] if lines else type(error).__name__  # drop the echoed compiler command
    detail = next((line for line in lines[1:] if "error" in line.lower()), None)
    text = head if detail is None else f"{head}; first error: {detail}"
    return text[:width] + ("..." if len(text) > width else "")


def _load_once(state, name, load, device):
    """state's module: imported, else built by load(), else None after one warning; the outcome is cached."""
    if state["tried"]:  # fast path once loaded (or given up); torch.compile traces only this
        return state["module"]
    return _load_now(state, name, load, device)


@torch.compiler.disable
def _load_now(state, name, load, device):
    with _lock:
        if not state["tried"]:
            module = _import_prebuilt(name)
            if module is None:
                try:
                    module = load()
                except Exception as error:  # any build failure degrades to the PyTorch path
                    warnings.warn(f"{name}: building the {device} op failed ({_summary(error)}); using the "
                                  f"PyTorch path (see {load.__name__}(verbose=True) for the compiler output)",
                                  RuntimeWarning, stacklevel=5)
            state["module"] = module
            state["tried"] = True  # set last: the fast path reads it without the lock
        return state["module"]


def get_extension():
    """The CUDA op module, or None when it can neither be imported nor built (one warning, then cached).

    Called on the first use with CUDA tensors, never at import time.
    """
    return _load_once(_state, EXTENSION_NAME, load_extension, "CUDA")


def get_cpu_extension():
    """The CPU op module, or None when it can neither be imported nor built (one warning, then cached).

    Called on the first use with CPU tensors, never at import time.
    """
    return _load_once(_cpu_state, CPU_EXTENSION_NAME, load_cpu_extension, "CPU")


def compiled_extension(device):
    """The compiled op module for `device` (a torch.device: CUDA, else the CPU op), loaded lazily; None when it
    cannot be loaded."""
    return get_extension() if device.type == "cuda" else get_cpu_extension()


def reset_extension_cache():
    """Forget the cached load results (for tests)."""
    with _lock:
        for state in (_state, _cpu_state):
            state["tried"] = False
            state["module"] = None

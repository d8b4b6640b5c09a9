"""Loading of the compiled MultiScaleDeformableAttention ops (CUDA, and CPU): prebuilt import, else JIT build,
else None (the PyTorch path)."""
import importlib
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path

import torch

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


def extension_sources():
    """The C++ and CUDA source files of the CUDA op, as strings."""
    return [str(SOURCE_DIR / "binding.cpp"), str(SOURCE_DIR / "cuda" / "ms_deform_attn_cuda.cu")]


def cpu_extension_sources():
    """The C++ source files of the CPU op, as strings."""
    return [str(SOURCE_DIR / "cpu" / "ms_deform_attn_cpu.cpp")]


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


def load_extension(verbose=False, arch_list=None, build_directory=None):
    """Compile (or reuse the cached build of) the op with ninja and import it; raises on failure.

    arch_list: e.g. "8.0" or "8.0;9.0+PTX"; default TORCH_CUDA_ARCH_LIST, else the visible GPUs, else
    DEFAULT_ARCH_LIST, so this also works on a machine without a GPU. build_directory: default
    $TORCH_EXTENSIONS_DIR/MultiScaleDeformableAttention, else ~/.cache/torch_extensions/py<XY>_cu<XY>/
    MultiScaleDeformableAttention; ninja rebuilds only what changed. Needs nvcc and ninja, not a GPU.
    """
    cpp_extension = _cpp_extension()

    if configure_cuda_home() is None:
        raise OSError("no CUDA toolkit found: set CUDA_HOME to the directory holding bin/nvcc")
    if arch_list is None and not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        arch_list = DEFAULT_ARCH_LIST
    if build_directory is not None:
        os.makedirs(build_directory, exist_ok=True)
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # read by cpp_extension when it writes the nvcc flags
    try:
        return cpp_extension.load(
            name=EXTENSION_NAME, sources=extension_sources(), extra_cflags=["-O3"], extra_cuda_cflags=NVCC_FLAGS,
            build_directory=None if build_directory is None else str(build_directory), verbose=verbose)
    finally:
        if arch_list is not None:
            if previous is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = previous


def load_cpu_extension(verbose=False, build_directory=None):
    """Compile (or reuse the cached build of) the CPU op with ninja and a C++ compiler, and import it; raises on
    failure. build_directory: default $TORCH_EXTENSIONS_DIR/MultiScaleDeformableAttentionCPU (else
    ~/.cache/torch_extensions/...); about half a minute the first time."""
    cpp_extension = _cpp_extension()

    if build_directory is not None:
        os.makedirs(build_directory, exist_ok=True)
    return cpp_extension.load(
        name=CPU_EXTENSION_NAME, sources=cpu_extension_sources(), extra_cflags=CPU_FLAGS, extra_ldflags=["-fopenmp"],
        build_directory=None if build_directory is None else str(build_directory), verbose=verbose)


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

"""Loading of the compiled MultiScaleDeformableAttention op: prebuilt import, else JIT build, else None."""
import os
import shutil
import threading
import warnings
from pathlib import Path

import torch

EXTENSION_NAME = "MultiScaleDeformableAttention"
SOURCE_DIR = Path(__file__).resolve().parents[1] / "src"
# used when neither TORCH_CUDA_ARCH_LIST nor a visible GPU says which architectures to build for
DEFAULT_ARCH_LIST = "7.5;8.0;8.6;9.0+PTX"
NVCC_FLAGS = ["-O3"]

_lock = threading.Lock()
_state = {"tried": False, "module": None}


def extension_sources():
    """The C++ and CUDA source files of the op, as strings."""
    return [str(SOURCE_DIR / "binding.cpp"), str(SOURCE_DIR / "cuda" / "ms_deform_attn_cuda.cu")]


def find_cuda_home():
    """A CUDA toolkit root holding bin/nvcc and include/cuda_runtime.h, or None.

    Tries $CUDA_HOME, $CUDA_PATH, torch's own guess, the resolved nvcc on PATH and /usr/local/cuda: torch
    guesses the parent of `which nvcc`, which is wrong when nvcc is a wrapper script in /usr/local/bin.
    """
    from torch.utils import cpp_extension

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
    from torch.utils import cpp_extension

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
    from torch.utils import cpp_extension

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


def _import_prebuilt():
    """The module installed by `python setup.py install`, or None."""
    try:
        import MultiScaleDeformableAttention
    except ImportError:
        return None
    return MultiScaleDeformableAttention


def _summary(error, width=200):
    """One line about a build failure: its first line and the first compiler error, if any."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    head = lines[0].split(": [")[0] if lines else type(error).__name__  # drop the echoed compiler command
    detail = next((line for line in lines[1:] if "error" in line.lower()), None)
    text = head if detail is None else f"{head}; first error: {detail}"
    return text[:width] + ("..." if len(text) > width else "")


def get_extension():
    """The op module, or None when it can neither be imported nor built (one warning, then cached).

    Called on the first use with CUDA tensors, never at import time.
    """
    if _state["tried"]:  # fast path once loaded (or given up)
        return _state["module"]
    with _lock:
        if not _state["tried"]:
            module = _import_prebuilt()
            if module is None:
                try:
                    module = load_extension()
                except Exception as error:  # any build failure degrades to the PyTorch path
                    warnings.warn(f"{EXTENSION_NAME}: building the CUDA op failed ({_summary(error)}); using the "
                                  "PyTorch path (see load_extension(verbose=True) for the compiler output)",
                                  RuntimeWarning, stacklevel=3)
            _state["module"] = module
            _state["tried"] = True  # set last: the fast path reads it without the lock
        return _state["module"]


def reset_extension_cache():
    """Forget the cached load result (for tests)."""
    with _lock:
        _state["tried"] = False
        _state["module"] = None

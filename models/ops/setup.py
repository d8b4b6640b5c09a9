"""Build and install the compiled MultiScaleDeformableAttention ops: `python setup.py build install`.

Always the CPU op (MultiScaleDeformableAttentionCPU, a C++ compiler with OpenMP); the CUDA op
(MultiScaleDeformableAttention) too when nvcc is found (CUDA_HOME), no GPU needed. CUDA architectures come from
TORCH_CUDA_ARCH_LIST, else the visible GPUs, else functions.extension.DEFAULT_ARCH_LIST. Without an installed op
the first use builds it just in time (functions/extension.py).
"""
import os
import sys
from pathlib import Path

import torch
from setuptools import setup

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from functions.extension import (  # noqa: E402
    CPU_EXTENSION_NAME,
    CPU_FLAGS,
    DEFAULT_ARCH_LIST,
    EXTENSION_NAME,
    NVCC_FLAGS,
    _cpp_extension,
    configure_cuda_home,
    cpu_extension_sources,
    extension_sources,
)

cpp_extension = _cpp_extension()


def relative(sources):
    return [os.path.relpath(source, HERE) for source in sources]  # setuptools wants paths relative to this directory


modules = [cpp_extension.CppExtension(name=CPU_EXTENSION_NAME, sources=relative(cpu_extension_sources()),
                                      extra_compile_args=CPU_FLAGS, extra_link_args=["-fopenmp"])]
if configure_cuda_home() is not None:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    modules.append(cpp_extension.CUDAExtension(name=EXTENSION_NAME, sources=relative(extension_sources()),
                                               extra_compile_args={"cxx": ["-O3"], "nvcc": NVCC_FLAGS}))
else:
    print(f"no CUDA toolkit (nvcc) found: building {CPU_EXTENSION_NAME} only; set CUDA_HOME for {EXTENSION_NAME}")

setup(
    name=EXTENSION_NAME,
    version="1.1",
    description="Multi-scale deformable attention ops (CUDA and CPU) for H-Deformable-DETR",
    ext_modules=modules,
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)

"""Build and install the MultiScaleDeformableAttention CUDA op: `python setup.py build install`.

Needs nvcc (CUDA_HOME), not a GPU. Architectures come from TORCH_CUDA_ARCH_LIST, else the visible GPUs,
else functions.extension.DEFAULT_ARCH_LIST.
"""
import os
import sys
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from functions.extension import (  # noqa: E402
    DEFAULT_ARCH_LIST, EXTENSION_NAME, NVCC_FLAGS, configure_cuda_home, extension_sources)

if configure_cuda_home() is None:
    raise RuntimeError("MultiScaleDeformableAttention needs the CUDA toolkit (nvcc): set CUDA_HOME")
if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST

setup(
    name=EXTENSION_NAME,
    version="1.0",
    description="Multi-scale deformable attention CUDA op for H-Deformable-DETR",
    ext_modules=[CUDAExtension(
        name=EXTENSION_NAME,
        # setuptools wants paths relative to this directory
        sources=[os.path.relpath(source, HERE) for source in extension_sources()],
        extra_compile_args={"cxx": ["-O3"], "nvcc": NVCC_FLAGS},
    )],
    cmdclass={"build_ext": BuildExtension},
)

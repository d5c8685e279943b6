"""Builds the optional CUDA extension ``appo_kernels._C`` (csrc/), only where torch has CUDA and
a CUDA compiler is present. Everything else is plain Python, configured in pyproject.toml.

``APPO_KERNELS_BUILD_CUDA=1`` forces the build (fails loudly if it cannot), ``=0`` skips it.
"""

import os

from setuptools import setup


def cuda_extensions():
    choice = os.environ.get("APPO_KERNELS_BUILD_CUDA", "auto").strip().lower()
    if choice in ("0", "false", "no", "off"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if choice in ("1", "true", "yes", "on"):
            raise
        return [], {}
    wanted = choice in ("1", "true", "yes", "on")
    if not wanted and not (torch.version.cuda and CUDA_HOME):
        return [], {}
    sources = sorted(
        os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith((".cu", ".cpp"))
    )
    if not sources:
        return [], {}
    ext = CUDAExtension(
        name="appo_kernels._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

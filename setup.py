"""Build script. The pure-Python package (fastenc + fastenc.kernels) is described in pyproject.toml.

This file adds the CUDA extension `fastenc._C`, built from csrc/ (*.cu plain CUDA kernels + bindings.cpp, the only
file with torch headers), when a CUDA build of torch and nvcc are importable/findable at build time. Under pip's
default build isolation torch is not importable here, so the extension is skipped; build it with
`pip install -e . --no-build-isolation` on a CUDA machine, or let fastenc JIT-build it on first use of
backend="cuda" (fastenc/core/cuda.py). A CPU-only torch installs cleanly without it.

Environment:
  FASTENC_SKIP_CUDA_BUILD=1   skip the extension build
  TORCH_CUDA_ARCH_LIST        target architectures (default here: "8.0;9.0a", A100 and H100/H200)
"""

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
DEFAULT_ARCH_LIST = "8.0;9.0a"


def cuda_extensions():
    csrc = ROOT / "csrc"
    sources = sorted(str(p.relative_to(ROOT)) for p in csrc.glob("*.cu"))
    if not sources or os.environ.get("FASTENC_SKIP_CUDA_BUILD", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if CUDA_HOME is None or not torch.version.cuda:
        print("fastenc: no CUDA torch or nvcc found; building without fastenc._C (Triton and torch backends only)")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    bindings = sorted(str(p.relative_to(ROOT)) for p in csrc.glob("*.cpp"))
    ext = CUDAExtension(
        "fastenc._C",
        sources + bindings,
        include_dirs=[str(csrc)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++17"]},
    )
    # ninja compiles the .cu files (one per op family / dtype) in parallel
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""--prebuild: on the CPU machine, build the CUDA ops library that a session carries instead of JIT-building."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from .common import PREBUILT_NAME, utc_now


def prebuild(dest: Path) -> int:
    """On the CPU machine, with the GPU machine's torch (2.11.0+cu130) and nvcc: build csrc/ into
    dest/fastenc_cuda_prebuilt.so (+ meta.json), the flags of fastenc's JIT build, for TORCH_CUDA_ARCH_LIST (default
    9.0a). Carry dest with the device call; the session loads it instead of building (its meta must match)."""
    import tempfile

    import torch
    from torch.utils import cpp_extension

    from fastenc.core import cuda as _cuda

    if not torch.version.cuda:
        print(
            f"gpu_session --prebuild: torch {torch.__version__} is a CPU build; run this with the GPU machine's "
            "torch (2.11.0+cu130) installed, e.g. in a venv",
            file=sys.stderr,
        )
        return 2
    if cpp_extension.CUDA_HOME is None:
        print("gpu_session --prebuild: nvcc / CUDA_HOME not found", file=sys.stderr)
        return 2
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    build = Path(tempfile.mkdtemp(prefix="fastenc-prebuild-"))
    t0 = time.perf_counter()
    cpp_extension.load(
        name=PREBUILT_NAME,
        sources=[str(p) for p in _cuda._sources()],
        extra_include_paths=[str(_cuda.CSRC)],
        extra_cuda_cflags=["-O3", "-std=c++17"],
        extra_cflags=["-O3"],
        build_directory=str(build),
        is_python_module=False,
        verbose=True,
    )
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build / f"{PREBUILT_NAME}.so", dest / f"{PREBUILT_NAME}.so")
    meta = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "source_hash": _cuda.source_hash(),
        "arch_list": os.environ["TORCH_CUDA_ARCH_LIST"],
        "python": platform.python_version(),
        "build_s": time.perf_counter() - t0,
        "time": utc_now(),
    }
    (dest / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(build, ignore_errors=True)
    print(f"gpu_session --prebuild: {dest / (PREBUILT_NAME + '.so')} in {meta['build_s']:.0f} s; carry {dest}")
    return 0

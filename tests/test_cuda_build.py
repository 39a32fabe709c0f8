"""CI checks of the CUDA backend that need no GPU: every csrc/*.cu compiles stand-alone with the machine's nvcc for
sm_90a and sm_80, the binding compiles against torch's headers, and fastenc.core.cuda imports and explains itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import fastenc
from fastenc.core import cuda as _cuda
from fastenc.core.errors import BackendUnavailableError

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
ARCHS = ("sm_90a", "sm_80")
NVCC = shutil.which("nvcc")
# torch's extension builds compile .cu files with these defines; the kernels must build under them too
TORCH_NVCC_DEFINES = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
)


def _compile(cu: Path, arch: str, out_dir: Path) -> tuple[str, int, str]:
    obj = out_dir / f"{cu.stem}.{arch}.o"
    cmd = [NVCC, "-std=c++17", f"-arch={arch}", "-O3", *TORCH_NVCC_DEFINES, "-c", str(cu), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return f"{cu.name} -arch={arch}", proc.returncode, proc.stdout + proc.stderr


def test_csrc_has_the_kernels():
    names = {p.name for p in CU_FILES}
    assert {"norm.cu", "activation.cu", "attention_f16.cu", "attention_bf16.cu"} <= names, names
    assert [p.name for p in CSRC.glob("*.cpp")] == ["bindings.cpp"]


def test_no_torch_headers_in_cu_files():
    for p in [*CU_FILES, *CSRC.glob("*.cuh"), *CSRC.glob("*.h")]:
        text = p.read_text()
        for banned in ("<torch/", "<ATen/", "<c10/", "<pybind11"):
            assert banned not in text, f"{p.name} includes {banned}: only bindings.cpp may include torch headers"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_every_cu_compiles_standalone(tmp_path):
    """nvcc -std=c++17 -arch={sm_90a, sm_80} -c on each .cu, two compiles at a time."""
    jobs = [(cu, arch) for cu in CU_FILES for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: _compile(*job, tmp_path), jobs))
    failed = [f"{name} (rc {rc}):\n{log[-3000:]}" for name, rc, log in results if rc != 0]
    assert not failed, "\n\n".join(failed)
    assert len(results) == 2 * len(CU_FILES)
    for cu, arch in jobs:
        assert (tmp_path / f"{cu.stem}.{arch}.o").stat().st_size > 0


def _torch_include_dirs() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    return include_paths()


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
def test_binding_compiles_against_torch_headers(tmp_path):
    """Syntax check of bindings.cpp with torch's headers (the CPU wheel ships c10/cuda headers but not the generated
    c10/cuda/impl/cuda_cmake_macros.h, which an empty stand-in replaces) and the CUDA toolkit's headers."""
    cuda_inc = Path(NVCC).resolve().parent.parent / "include" if NVCC else None
    candidates = [cuda_inc, Path("/usr/local/cuda/include")]
    cuda_inc = next((p for p in candidates if p is not None and (p / "cuda_runtime_api.h").exists()), None)
    if cuda_inc is None:
        pytest.skip("no CUDA toolkit headers (cuda_runtime_api.h) found")
    torch_inc = _torch_include_dirs()
    if not (Path(torch_inc[0]) / "c10" / "cuda" / "CUDAGuard.h").exists():
        pytest.skip("this torch wheel ships no c10/cuda headers")
    stub = tmp_path / "stub"
    (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
    (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-w", f"-I{CSRC}", f"-I{cuda_inc}", f"-I{stub}"]
    cmd += [f"-I{p}" for p in torch_inc] + [f"-I{sysconfig.get_paths()['include']}", str(CSRC / "bindings.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_import_is_cheap_and_explains_itself():
    """Importing fastenc.core.cuda builds nothing and works on a CPU-only torch; the reason names the cause."""
    code = "import sys, fastenc, fastenc.core.cuda; assert 'torch.utils.cpp_extension' not in sys.modules; print('ok')"
    env = {**os.environ, "PYTHONPATH": str(Path(fastenc.__file__).parent.parent)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the message a CPU-only torch gets")
def test_unavailable_reason_on_cpu_torch():
    why = _cuda.unavailable_reason()
    assert why is not None and "CPU-only build" in why and torch.__version__ in why, why
    with pytest.raises(BackendUnavailableError, match="CPU-only build"):
        _cuda.extension()
    assert not _cuda.is_loaded()
    x = torch.randn(3, 8)
    assert "CUDA tensors" in _cuda.cuda_norm_unsupported_reason(x)
    assert "CUDA tensors" in _cuda.cuda_activation_unsupported_reason(x)
    with pytest.raises(BackendUnavailableError):
        _cuda.cuda_layer_norm_forward(x, torch.ones(8), None, 1e-5, None)


def test_attention_unsupported_reasons():
    """The reasons that do not depend on the device: what the short-sequence kernel refuses, checked first."""
    h = torch.float16
    q = torch.zeros(1, 2, 5, 64, dtype=h)
    kv = torch.zeros(1, 2, 5, 64, dtype=h)
    assert "fp16/bf16 only" in _cuda.cuda_attention_unsupported_reason(q.float(), kv.float(), kv.float(), None)
    assert "bias" in _cuda.cuda_attention_unsupported_reason(q, kv, kv, torch.zeros(1, 1, 5, 5, dtype=h))
    assert "relative" in _cuda.cuda_attention_unsupported_reason(q, kv, kv, None, torch.zeros(4, 2))
    long_kv = torch.zeros(1, 2, 129, 64, dtype=h)
    assert "Sk 129" in _cuda.cuda_attention_unsupported_reason(q, long_kv, long_kv, None)
    wide = torch.zeros(1, 2, 5, 160, dtype=h)
    assert "head dim 160" in _cuda.cuda_attention_unsupported_reason(wide, wide, wide, None)
    # supported shapes get as far as the device / build check
    assert _cuda.cuda_attention_unsupported_reason(q, kv, kv, None) == _cuda._device_reason(q)


def test_bad_activation_is_a_typed_error():
    with pytest.raises(fastenc.core.errors.InputError, match="activation must be one of"):
        _cuda.cuda_bias_activation_forward(torch.zeros(2, 3), None, "swish")


def test_norm_limits_match_the_header():
    header = (CSRC / "fastenc_cuda.h").read_text()
    assert f"#define FASTENC_NORM_MAX_N {_cuda.NORM_MAX_N}" in header
    assert f"#define FASTENC_ATTN_MAX_SEQLEN_K {_cuda.ATTN_MAX_SEQLEN_K}" in header
    assert f"#define FASTENC_ATTN_MAX_HEAD_DIM {_cuda.ATTN_MAX_HEAD_DIM}" in header
    assert "exceeds the 16384 columns" in _cuda.cuda_norm_unsupported_reason(torch.zeros(1, _cuda.NORM_MAX_N + 1))


def test_one_schema_per_op_in_both_namespaces():
    """torch.ops.fastenc_cuda.<op> (csrc/bindings.cpp) has exactly the schema of torch.ops.fastenc.<op> (the Triton
    op): one argument order and output convention per op, so one reference and one dispatch serve both."""
    import re

    from fastenc.ops._library import CUDA_OPS, register_triton_ops

    register_triton_ops()
    src = (CSRC / "bindings.cpp").read_text()
    defs = {}
    for m in re.finditer(r'm\.def\(\s*((?:"[^"]*"\s*)+)\)', src):
        text = "".join(re.findall(r'"([^"]*)"', m.group(1)))
        defs[text.split("(", 1)[0]] = text
    assert sorted(defs) == sorted(CUDA_OPS)
    for name, text in defs.items():
        assert f"fastenc::{text}" == str(getattr(torch.ops.fastenc, name).default._schema), name

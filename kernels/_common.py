"""Helpers shared by the kernel files: interpreter detection, tl.dot operand flags, fp32 -> dtype rounding.

Not ops: no launchers here, only what several op families need to agree on.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run on CPU tensors through Triton's numpy interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def traceable(kernel):
    """`kernel` as the launchers must call it: through `torch.library.wrap_triton` on CUDA, where the ops are
    `triton_op`s and Inductor / AOT autograd trace the launcher with fake tensors (a bare `kernel[grid](...)` would
    launch on them and fail); wrap_triton hands back the kernel itself when not tracing. Under the interpreter the
    ops are plain custom_ops and the kernel is returned as is (torch < 2.13's wrap_triton rejects interpreted ones).
    """
    if interpreting():
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def on_device(t: torch.Tensor):
    """Launch context: the tensor's CUDA device current (a tensor on cuda:1 must not launch on cuda:0)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _fp32_dot_precision() -> str:
    """IEEE fp32 dots unless the user allowed TF32 in torch (DESIGN.md, Numerics)."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_FP32, DOT_PRECISION) for tiles of `dtype`.

    NOTE: in the Triton 3.9 interpreter tl.dot on bf16 operands returns garbage: it matmuls the raw uint16 storage
    (max abs error 8.5e10 measured on a 16x64 @ 64x16 randn tile; 2.8e10 in the issue's measurement), while fp32 and
    fp16 operands are right (3.8e-6 after upcasting to fp32). So under the interpreter bf16 tiles are upcast to fp32
    before tl.dot; on GPU the dots stay native bf16 / fp16 (tensor cores)."""
    dot_fp32 = interpreting() and dtype == torch.bfloat16
    precision = _fp32_dot_precision() if dtype == torch.float32 or dot_fp32 else "tf32"
    return dot_fp32, precision


@triton.jit
def _to_bf16_rtne(x):
    """fp32 -> bf16, round to nearest even, by bit arithmetic.

    NOTE: the Triton 3.9 interpreter truncates fp32 -> bf16 casts (and mangles fp32 subnormals) where CUDA rounds to
    nearest even; rounding the bits ourselves gives the CUDA result in both places, so CPU tests see the GPU math.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # NaN stays NaN (a low-bits payload would carry to inf)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """Round fp32 x to `dtype` (round to nearest even for every float dtype)."""
    if dtype == tl.bfloat16:
        return _to_bf16_rtne(x)
    else:
        return x.to(dtype)


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dim has unit stride (or size 1), else a contiguous copy: what the kernels' loads need."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()

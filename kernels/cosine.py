"""Fused cosine-similarity matrix: row norms computed inside the tiled matmul, applied in the epilogue.

Math, for a: (M, D), b: (N, D) (all arithmetic in fp32, whatever the input dtype):
    out_ij = scale * (a_i . b_j) / (max(|a_i|, EPS) * max(|b_j|, EPS))        EPS = 1e-12, as F.normalize
so a zero row gives 0, never NaN. One program owns a (BLOCK_M, BLOCK_N) output tile and streams BLOCK_K slices of
the feature dim: the same loads feed the dot and the running sums of squares of its a rows and b rows, so the norms
cost no extra pass over memory (each program recomputes the norms of its own rows: O(BLOCK * D) flops next to the
tile's O(BLOCK_M * BLOCK_N * D)).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import _round_to, dot_flags, interpreting, last_dim_contiguous, traceable

# ---------------------------------------------------------------------------------------------------- constants

EPS = 1e-12  # F.normalize's default eps: rows are divided by max(norm, EPS)
_EPS = tl.constexpr(EPS)
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16

# Under the interpreter every program runs in numpy: small tiles keep tests fast and still exercise several tiles
# along every axis, plus the tails, at the awkward sizes the tests use.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}

# CUDA candidates (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the Triton matmul tutorial's space on H100,
# less those that spill registers for an input dtype (SPILLS_WITH). The sums of squares upcast the a / b tiles to
# fp32 in registers next to the dot's accumulator, which costs more for fp32 and bf16 operands.
# NOTE: measured on sm_90a without a GPU (triton.compile + cuobjdump --dump-resource-usage), stack bytes, Triton 3.6 /
# 3.9: fp32 (128, 128, 64, 8, 3) 2320 / 296, (128, 64, 64, 4, 4) 2032 / 592, (64, 128, 64, 4, 4) 2648 / 560;
# bf16 (128, 64, 64, 4, 4) 0 / 40; every other (config, dtype) 0 / 0 (fp16: all six).
CUDA_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 3),
    (64, 32, 32, 4, 3),
    (32, 32, 32, 4, 2),
]
SPILLS_WITH = {
    torch.float32: {(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)},
    torch.bfloat16: {(128, 64, 64, 4, 4)},
}


def cuda_configs(dtype: torch.dtype) -> list[tuple[int, int, int, int, int]]:
    """The autotune candidates for inputs of `dtype`: CUDA_CONFIGS less those measured to spill with it."""
    return [c for c in CUDA_CONFIGS if c not in SPILLS_WITH.get(dtype, set())]


# ---------------------------------------------------------------------------------------------------- kernel


@triton.jit
def _cosine_fwd_kernel(
    A,  # (M, D), last dim stride 1
    B,  # (N, D), last dim stride 1
    Out,  # (M, N) by strides
    stride_am,
    stride_bn,
    stride_om,
    stride_on,
    M,
    N,
    D,
    scale,
    DOT_FP32: tl.constexpr,  # upcast tiles to fp32 before tl.dot (bf16 under the interpreter)
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32"; matters for fp32 operands only
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    m_ok = offs_m < M
    n_ok = offs_n < N

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    ssq_a = tl.zeros([BLOCK_M], dtype=tl.float32)
    ssq_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        a = tl.load(A + offs_m[:, None] * stride_am + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(B + offs_n[:, None] * stride_bn + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        a32 = a.to(tl.float32)
        b32 = b.to(tl.float32)
        ssq_a += tl.sum(a32 * a32, 1)
        ssq_b += tl.sum(b32 * b32, 1)
        if DOT_FP32:
            acc = tl.dot(a32, tl.trans(b32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)

    inv_a = 1.0 / tl.maximum(tl.sqrt(ssq_a), _EPS)  # (BLOCK_M,)
    inv_b = 1.0 / tl.maximum(tl.sqrt(ssq_b), _EPS)  # (BLOCK_N,)
    out = acc * (inv_a * scale)[:, None] * inv_b[None, :]
    o_ptrs = Out + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, _round_to(out, Out.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------------------- launchers


@functools.cache
def _autotuned_cosine_kernel(dtype: torch.dtype):
    """The CUDA entry point for inputs of `dtype`, autotuned over `cuda_configs(dtype)`; never built under the
    interpreter."""
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in cuda_configs(dtype)
    ]
    return triton.autotune(configs=configs, key=["M_BUCKET", "N_BUCKET", "D"])(_cosine_fwd_kernel_bucketed)


@triton.jit
def _cosine_fwd_kernel_bucketed(
    A, B, Out, stride_am, stride_bn, stride_om, stride_on, M, N, D, scale, M_BUCKET, N_BUCKET,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """`_cosine_fwd_kernel` with autotune keys (next power of two of M and N, capped)."""
    _cosine_fwd_kernel(
        A, B, Out, stride_am, stride_bn, stride_om, stride_on, M, N, D, scale,
        DOT_FP32, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip


def cosine_unsupported_reason(a: torch.Tensor) -> str | None:
    """None if `cosine_similarity_forward` handles these inputs, else a short reason."""
    if a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {a.dtype} is not fp32/fp16/bf16"
    if a.device.type != "cuda" and not (a.device.type == "cpu" and interpreting()):
        return f"device {a.device} needs CUDA or TRITON_INTERPRET=1"
    return None


def cosine_similarity_forward(
    a: torch.Tensor, b: torch.Tensor, *, scale: float = 1.0, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """scale * normalize(a) @ normalize(b).T, a: (M, D), b: (N, D) -> (M, N) in out_dtype (default a.dtype)."""
    m, d = a.shape
    n = b.shape[0]
    out = torch.empty(m, n, dtype=out_dtype or a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    if d == 0:
        return out.zero_()
    a, b = last_dim_contiguous(a), last_dim_contiguous(b)
    dot_fp32, precision = dot_flags(a.dtype)
    args = (a, b, out, a.stride(0), b.stride(0), out.stride(0), out.stride(1), m, n, d, float(scale))
    if interpreting():
        cfg = INTERPRETER_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
        _cosine_fwd_kernel[grid](*args, DOT_FP32=dot_fp32, DOT_PRECISION=precision, **cfg)
        return out

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    buckets = (min(8192, triton.next_power_of_2(m)), min(8192, triton.next_power_of_2(n)))
    with torch.cuda.device(a.device):
        traceable(_autotuned_cosine_kernel(a.dtype))[grid](*args, *buckets, DOT_FP32=dot_fp32, DOT_PRECISION=precision)
    return out

"""LayerNorm and T5-style RMSNorm forward over the last dim, each with an optional fused residual add.

One program normalises one row, held whole in registers (BLOCK_N = next_power_of_2(N) columns), so the statistics
are exact two-pass fp32 sums over the row and x is read from memory once:

    s = x + residual            (rounded to x.dtype, exactly as eager `residual + hidden_states`; stored as res_out)
    layer_norm: y = (s - mean(s)) * rsqrt(var(s) + eps) * w + b        var: biased (divide by N), fp32
    rms_norm:   y = w * (s * rsqrt(mean(s^2) + eps))                   no mean subtraction, no bias (T5LayerNorm);
                half w: the normalised value is rounded to w.dtype before the multiply, as transformers does

x may be any (..., N) tensor whose rows flatten to a 2-D view with unit column stride (a slice x[..., :N] of a
wider tensor is read in place through its row stride); anything else is copied to contiguous first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _round_to, on_device, traceable

# Widest row one program holds in registers (fp32 row + weight); wider rows run on torch.
# NOTE: 32 values per thread at most. At 32 warps a thread has 64 registers; measured on sm_90a (stack bytes, Triton
# 3.6 / 3.9, launch specialisation): 65536 columns spilled 144-264 B in every dtype, 32768 fp32 LayerNorm 16 / 16-24 B
# and RMSNorm + residual 0 / 56 B; 16384 columns (16 warps) and below: 0 B in every dtype, weight dtype and residual
# variant under both versions.
MAX_FUSED_N = 16384

# (smallest BLOCK_N, num_warps) on CUDA, first match from the top wins.
_NUM_WARPS_BY_BLOCK_N = ((32768, 32), (8192, 16), (2048, 8), (0, 4))


def _norm_config(n: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for rows of n columns: the whole row in one block, warps scaled with its width."""
    block_n = triton.next_power_of_2(n)
    num_warps = next(w for lo, w in _NUM_WARPS_BY_BLOCK_N if block_n >= lo)
    return block_n, num_warps


@triton.jit
def _load_row_sum(x_row, r_row, res_out_row, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """One row of s = x + residual as fp32, s rounded to x.dtype first and stored to res_out; s = x without residual."""
    s = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)
        s_low = _round_to(s + r, res_out_row.dtype.element_ty)
        tl.store(res_out_row + cols, s_low, mask=mask)
        s = s_low.to(tl.float32)
    return s


@triton.jit
def _layer_norm_fwd_kernel(
    X, R, W, B, Y, RES_OUT,  # X, R, RES_OUT: (M, N) in x.dtype; W, B: (N,) any float dtype; Y: (M, N) in x.dtype
    stride_x, stride_r, stride_y, stride_res_out,  # row strides; columns are contiguous
    N, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """y = (s - mean) * rsqrt(mean((s - mean)^2) + eps) * w + b over one row of s = x (+ residual); fp32 math."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    s = _load_row_sum(X + row * stride_x, R + row * stride_r, RES_OUT + row * stride_res_out, cols, mask, HAS_RESIDUAL)

    mean = tl.sum(s, axis=0) / N
    centered = tl.where(mask, s - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)

    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = centered * rstd * w
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, _round_to(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, RES_OUT,  # X, R, RES_OUT: (M, N) in x.dtype; W: (N,); Y: (M, N) in x.dtype (fp32 W) or W's dtype
    stride_x, stride_r, stride_y, stride_res_out,  # row strides; columns are contiguous
    N, eps,
    HAS_RESIDUAL: tl.constexpr, HALF_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """y = w * (s * rsqrt(mean(s^2) + eps)) over one row of s = x (+ residual); fp32 math.

    HALF_WEIGHT (w is fp16/bf16): the normalised value is rounded to w's dtype before the multiply, as T5LayerNorm.
    The product of two half values is exact in fp32, so rounding it once to Y's dtype equals the eager half multiply.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    s = _load_row_sum(X + row * stride_x, R + row * stride_r, RES_OUT + row * stride_res_out, cols, mask, HAS_RESIDUAL)

    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / N + eps)
    h = s * rstd
    if HALF_WEIGHT:
        h = _round_to(h, W.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, _round_to(w * h, Y.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t (..., n) as a (rows, n) view with unit column stride; copies only when no such view exists."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, n)


def norm_unsupported_reason(x: torch.Tensor) -> str | None:
    """None if the norm kernels can run on x (..., N), else why not: the whole row must fit one block."""
    n = x.shape[-1] if x.dim() else 1
    if n > MAX_FUSED_N:
        return f"hidden size {n} exceeds the {MAX_FUSED_N} columns one Triton norm program holds in registers"
    return None


def _launch(kernel, x, residual, params, y_dtype, eps, **flags):
    """Shared launcher: y (x.shape, y_dtype) and residual_out (x.shape, x.dtype, or None) from one pass over x."""
    n = x.shape[-1]
    x2 = _rows(x, n)
    y = torch.empty(x.shape, dtype=y_dtype, device=x.device)
    res_out = None if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    m = x2.shape[0]
    if m == 0:
        return y, res_out
    r2 = x2 if residual is None else _rows(residual, n)
    y2 = y.view(-1, n)
    ro2 = y2 if res_out is None else res_out.view(-1, n)  # a dummy when there is no residual (never written)
    block_n, num_warps = _norm_config(n)
    with on_device(x):
        traceable(kernel)[(m,)](
            x2, r2, *params, y2, ro2,
            x2.stride(0), r2.stride(0), y2.stride(0), ro2.stride(0),
            n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, num_warps=num_warps, **flags,
        )  # fmt: skip
    return y, res_out


def layer_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(LayerNorm(s), s) with s = x + residual rounded to x.dtype (s is None without residual). y in x.dtype.

    x, residual: (..., N), same dtype; weight, bias: (N,) in any float dtype (upcast in the kernel).
    """
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    return _launch(
        _layer_norm_fwd_kernel, x, residual, (weight, weight if bias is None else bias), x.dtype, eps,
        HAS_BIAS=bias is not None,
    )  # fmt: skip


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(RMSNorm(s), s) with s = x + residual rounded to x.dtype (s is None without residual), T5LayerNorm semantics.

    y's dtype is x.dtype for an fp32 weight and weight.dtype for an fp16/bf16 weight (as `rms_norm_reference`).
    """
    weight = weight.contiguous()
    half_weight = weight.dtype in (torch.float16, torch.bfloat16)
    y_dtype = weight.dtype if half_weight else x.dtype
    return _launch(_rms_norm_fwd_kernel, x, residual, (weight,), y_dtype, eps, HALF_WEIGHT=half_weight)

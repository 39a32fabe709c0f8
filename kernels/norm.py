"""LayerNorm and T5-style RMSNorm forward over the last dim, each with an optional fused residual add.

One program normalises one row, held whole in registers (BLOCK_N = next_power_of_2(N) columns), so the statistics
are exact two-pass fp32 sums over the row and x is read from memory once:

    s = x + residual            (rounded to x.dtype, exactly as eager `residual + hidden_states`; stored as res_out)
    layer_norm: y = (s - mean(s)) * rsqrt(var(s) + eps) * w + b        var: biased (divide by N), fp32
    rms_norm:   y = w * (s * rsqrt(mean(s^2) + eps))                   no mean subtraction, no bias (T5LayerNorm);
                half w: the normalised value is rounded to w.dtype before the multiply, as transformers does

Backward (one kernel per norm, Liger-Kernel's two-stage weight-gradient scheme): each program takes a contiguous
range of rows, recomputes the row statistics from the saved s (exactly the forward's fp32 sums, so no statistics are
stored), writes dx for its rows and accumulates dweight (and dbias) over them in fp32 registers; the (programs, N)
partial sums are then added by one torch .sum(0). With xhat = (s - mean) * rstd (LayerNorm) or s * rstd (RMSNorm)
and g = dy * w:

    layer_norm: ds = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dw = sum_rows(dy * xhat),  db = sum_rows(dy)
    rms_norm:   ds = rstd * (g - xhat * mean(g * xhat)),             dw = sum_rows(dy * xhat)  (half w: xhat rounded
                                                                     to w.dtype first, the value the forward multiplied)
    dx = dresidual = ds + d(s output)       the gradient of the returned x + residual adds in before the one rounding

x may be any (..., N) tensor whose rows flatten to a 2-D view with unit column stride (a slice x[..., :N] of a
wider tensor is read in place through its row stride); anything else is copied to contiguous first.
"""

from __future__ import annotations

import functools

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

# Widest row the backward kernels take; wider rows (no supported model: the widest, T5-XXL, is 4096) differentiate the
# torch reference instead. NOTE: 16384 columns spilled in every variant tried on sm_90a (Triton 3.9): 608 B (fp32
# LayerNorm) at 16 warps, 64-304 B at 32 warps, 16-208 B with the partial sums accumulated in memory, not registers.
MAX_FUSED_BWD_N = 8192

# (smallest BLOCK_N, num_warps) on CUDA, first match from the top wins.
_NUM_WARPS_BY_BLOCK_N = ((32768, 32), (8192, 16), (2048, 8), (0, 4))
# Backward: s / xhat, dy, w, g and the dw (and db) accumulators are live per column, more than in the forward, so wide
# rows get more warps. NOTE: with this table every report width compiles with 0 B stack on sm_90a and sm_80 under
# Triton 3.9 and 3.6 (`python bench/static_report.py --only norm_bwd`); RMSNorm spilled 8 B at 4096 columns with
# 8 or 16 warps (Triton 3.6) and at 8192 with 16 warps (fp32 + residual, Triton 3.9).
_NUM_WARPS_BY_BLOCK_N_BWD = ((4096, 32), (2048, 8), (0, 4))


def _norm_config(n: int, table=_NUM_WARPS_BY_BLOCK_N) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for rows of n columns: the whole row in one block, warps scaled with its width."""
    block_n = triton.next_power_of_2(n)
    num_warps = next(w for lo, w in table if block_n >= lo)
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


@triton.jit
def _store_ds(DS, DX, DRES, row, stride_ds, N, cols, mask, ds, HAS_DS: tl.constexpr, STORE_DRES: tl.constexpr):
    """dx (and dresidual) of one row: ds (fp32) plus the incoming gradient of the s output, rounded once."""
    if HAS_DS:
        ds += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
    ds_low = _round_to(ds, DX.dtype.element_ty)
    tl.store(DX + row * N + cols, ds_low, mask=mask)
    if STORE_DRES:
        tl.store(DRES + row * N + cols, ds_low, mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, DS, S, W, DX, DRES, DW, DB,  # DY: (M, N) y's dtype; DS, S: (M, N) s's dtype; W: (N,); DX, DRES: (M, N)
    stride_dy, stride_ds, stride_s,  # contiguous, s's dtype; DW, DB: (programs, N) fp32 partial sums. Row strides.
    M, N, rows_per_program, eps,
    HAS_DS: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_DRES: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """LayerNorm backward over rows [pid * rows_per_program, ...): dx per row, dw / db partial sums per program."""
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for row in range(row_start, row_end):
        s = tl.load(S + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(s, axis=0) / N
        centered = tl.where(mask, s - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / N + eps)  # the forward's statistics, recomputed
        xhat = centered * rstd
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
        g = dy * w
        c1 = tl.sum(g, axis=0) / N
        c2 = tl.sum(g * xhat, axis=0) / N
        _store_ds(DS, DX, DRES, row, stride_ds, N, cols, mask, (g - c1 - xhat * c2) * rstd, HAS_DS, STORE_DRES)
    tl.store(DW + pid * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB + pid * N + cols, db, mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, DS, S, W, DX, DRES, DW,  # DY: (M, N) y's dtype; DS, S: (M, N) s's dtype; W: (N,); DX, DRES: (M, N)
    stride_dy, stride_ds, stride_s,  # contiguous, s's dtype; DW: (programs, N) fp32 partial sums. Row strides.
    M, N, rows_per_program, eps,
    HAS_DS: tl.constexpr, HALF_WEIGHT: tl.constexpr, STORE_DRES: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """RMSNorm backward over rows [pid * rows_per_program, ...): dx per row, dw partial sums per program.

    HALF_WEIGHT: dw sums dy * xhat rounded to w's dtype (what the forward multiplied w by); ds differentiates through
    that rounding as the identity, as autograd does through the reference's `.to(weight.dtype)`."""
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for row in range(row_start, row_end):
        s = tl.load(S + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / N + eps)  # the forward's statistic, recomputed
        xhat = s * rstd
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        if HALF_WEIGHT:
            dw += dy * _round_to(xhat, W.dtype.element_ty).to(tl.float32)
        else:
            dw += dy * xhat
        g = dy * w
        c2 = tl.sum(g * xhat, axis=0) / N
        _store_ds(DS, DX, DRES, row, stride_ds, N, cols, mask, (g - xhat * c2) * rstd, HAS_DS, STORE_DRES)
    tl.store(DW + pid * N + cols, dw, mask=mask)


def _norm_rows(t: torch.Tensor, n: int) -> torch.Tensor:
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


def norm_backward_unsupported_reason(s: torch.Tensor) -> str | None:
    """None if the norm backward kernels can run on rows like s (..., N), else why not."""
    n = s.shape[-1] if s.dim() else 1
    if n > MAX_FUSED_BWD_N:
        return f"hidden size {n} exceeds the {MAX_FUSED_BWD_N} columns one Triton norm backward program holds"
    return None


def _launch(kernel, x, residual, params, y_dtype, eps, **flags):
    """Shared launcher: y (x.shape, y_dtype) and residual_out (x.shape, x.dtype, or None) from one pass over x."""
    n = x.shape[-1]
    x2 = _norm_rows(x, n)
    y = torch.empty(x.shape, dtype=y_dtype, device=x.device)
    res_out = None if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    m = x2.shape[0]
    if m == 0:
        return y, res_out
    r2 = x2 if residual is None else _norm_rows(residual, n)
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


# ---------------------------------------------------------------------------------------------------- backward

# Backward programs on CUDA: PROGRAMS_PER_SM per SM (1: Liger-Kernel's choice), each looping over a contiguous range of
# rows, so the weight-gradient partial sums are (programs, N) fp32 whatever the row count. More programs per SM keep
# more warps resident (narrow rows run 4-warp programs) at the cost of a larger partial-sum buffer; the trade-off is
# not measured yet (no GPU in the session that wrote this: `python bench/bench_norm.py --backward` times it). Under the
# interpreter a few programs, so CPU tests cover several partial sums and an uneven last range.
PROGRAMS_PER_SM = 1
INTERPRETER_PROGRAMS = 4


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def reduction_programs(device: torch.device) -> int:
    """How many programs a backward kernel with per-program partial sums launches (at most) on `device`."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_PROGRAMS


def _row_split(m: int, device: torch.device) -> tuple[int, int]:
    """(programs, rows_per_program) covering m >= 1 rows, every program with at least one row."""
    rows_per_program = triton.cdiv(m, min(m, reduction_programs(device)))
    return triton.cdiv(m, rows_per_program), rows_per_program


def _launch_bwd(kernel, dy, ds, s, weight, eps, dresidual, partial_slots, n_partials, **flags):
    """Shared backward launcher: (dx, dresidual or None, [n_partials (programs, N) fp32 partial sums]).

    dy: (..., N) in y's dtype; ds: like s or None; s: (..., N), the saved input of the norm (x + residual or x).
    partial_slots: the kernel's partial-sum pointer arguments; slots past n_partials get the first buffer again (a
    dummy its flag keeps unwritten)."""
    n = s.shape[-1]
    dx = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    dres = torch.empty(s.shape, dtype=s.dtype, device=s.device) if dresidual else None
    s2 = _norm_rows(s, n)
    m = s2.shape[0]
    if m == 0:
        return dx, dres, [torch.zeros(1, n, dtype=torch.float32, device=s.device) for _ in range(n_partials)]
    programs, rows_per_program = _row_split(m, s.device)
    partials = [torch.empty(programs, n, dtype=torch.float32, device=s.device) for _ in range(n_partials)]
    slots = partials + partials[:1] * (partial_slots - n_partials)
    dy2 = _norm_rows(dy, n)
    ds2 = dy2 if ds is None else _norm_rows(ds, n)  # a dummy when there is no s gradient (never read)
    dx2 = dx.view(-1, n)
    dres2 = dx2 if dres is None else dres.view(-1, n)  # a dummy when dresidual is not wanted (never written)
    block_n, num_warps = _norm_config(n, _NUM_WARPS_BY_BLOCK_N_BWD)
    with on_device(s):
        traceable(kernel)[(programs,)](
            dy2, ds2, s2, weight, dx2, dres2, *slots,
            dy2.stride(0), ds2.stride(0), s2.stride(0),
            m, n, rows_per_program, eps,
            HAS_DS=ds is not None, STORE_DRES=dres is not None, BLOCK_N=block_n, num_warps=num_warps, **flags,
        )  # fmt: skip
    return dx, dres, partials


def layer_norm_backward(
    dy: torch.Tensor,
    ds: torch.Tensor | None,
    s: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    dresidual: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(dx, dresidual, dweight, dbias) of `layer_norm_forward`: dresidual (== dx, its own tensor) only if asked for,
    dbias only with a bias. dy: (..., N) in y's dtype; ds: the gradient of the returned x + residual (like s) or None;
    s: the normalised input (x + residual as the forward returned it, or x). dx in s's dtype; dweight / dbias summed
    in fp32, returned in weight's / bias's dtype."""
    weight = weight.contiguous()
    has_bias = bias is not None
    dx, dres, partials = _launch_bwd(
        _layer_norm_bwd_kernel, dy, ds, s, weight, eps, dresidual, 2, 2 if has_bias else 1, HAS_BIAS=has_bias
    )
    dweight = partials[0].sum(0).to(weight.dtype)
    dbias = partials[1].sum(0).to(bias.dtype) if has_bias else None
    return dx, dres, dweight, dbias


def rms_norm_backward(
    dy: torch.Tensor, ds: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor, eps: float, dresidual: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(dx, dresidual, dweight) of `rms_norm_forward`, arguments and dtypes as `layer_norm_backward` (dy is in y's
    dtype: weight's for a half weight)."""
    weight = weight.contiguous()
    half_weight = weight.dtype in (torch.float16, torch.bfloat16)
    dx, dres, partials = _launch_bwd(
        _rms_norm_bwd_kernel, dy, ds, s, weight, eps, dresidual, 1, 1, HALF_WEIGHT=half_weight
    )
    return dx, dres, partials[0].sum(0).to(weight.dtype)

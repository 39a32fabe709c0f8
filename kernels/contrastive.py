"""CLIP and SigLIP contrastive losses, tiled: the (N_a, N_b) logit matrix never leaves the chip.

Both losses are built from two row-wise primitives over a pair (A, B) of feature matrices, A: (N_a, D) the rows this
call owns, B: (N_b, D) every column, the positive of row i being column i + offset (offset = the global index of
A's first row; 0 single-process):
    z_ij = scale * A_i . B_j + bias                                                  (bias = 0 for CLIP)

1. row stats (`_contrastive_stats_kernel`), per row i of A, p = i + offset its positive column (CLIP needs p < N_b):
       CLIP:   r_i  = log sum_j exp(z_ij - z_ip)  (= lse_i - z_ip, the row's loss term, >= 0)
       SigLIP: sp_i = sum_j -logsigmoid(y_ij z_ij) = sum_j softplus(-y_ij z_ij),  y_ij = +1 if j == p else -1
   CLIP's loss is (sum_i r_row_i + sum_j r_col_j) / 2N: column terms are the row terms of the swapped pair (B, A),
   as z^T = scale * B @ A^T. SigLIP's loss is sum_i sp_i / N.
   Precision near a zero loss: lse_i - z_ip cancels (both ~ scale, the difference can be 1e-6; fp32 keeps ~scale *
   6e-8 of it), and so does log(1 + tiny). So r_i is computed from the differences u_ij = z_ij - z_ip directly: an
   online max m_i >= 0 and sum acc_i of exp(u_ij - m_i) over the negatives j != p (the positive's exp(0) kept apart),
   then r_i = log1p(acc_i) if m_i == 0 else m_i + log(exp(-m_i) + acc_i) (no cancellation in either branch). z_ip
   is computed once per row by its own K loop. softplus(x) = max(x, 0) + log1p(exp(-|x|)). log1p is `_log1p`
   below: Triton's interpreter has no libdevice log1p, and log(1 + x) loses everything below fp32 epsilon.

2. row grads (`_contrastive_grad_kernel`): dA_i = scale * coef * sum_j g_ij B_j, plus per-row partial sums of the
   scalar grads ds_i = coef * sum_j g_ij (A_i . B_j) and db_i = coef * sum_j g_ij, with dL/dz_ij = coef * g_ij:
       CLIP:   g_ij = exp(z_ij - lse_row_i) + exp(z_ij - lse_col_j) for j != p, and g_ip = 0 (left out)
       SigLIP: g_ij = -y_ij sigmoid(-y_ij z_ij),                                           coef = 1 / N
   with lse = r + z_ip passed in as the stats (coef = 1 / 2N for CLIP). CLIP's positive entry, g_ip = (P_ip - 1) +
   (Q_ip - 1) = expm1(-r_row_i) + expm1(-r_col_p), is left to the caller, which holds r precisely (from lse it would
   be a difference of two ~scale numbers again); fastenc.ops.contrastive adds it, an O(N d) term.
   Both g are symmetric under swapping (A, row stats) with (B, column stats), so dB is the same kernel on the
   swapped pair. The backward therefore recomputes the dot products twice (once for dA, once for dB): 4 matmuls of
   work in total instead of the minimal 3, in exchange for no atomics and no (N_a, N_b) buffer.
   coef is applied after the g @ B dot, so g (values in [-2, 2]) is fed to tensor cores in fp16 without underflow.

One program owns BLOCK_M rows of A and streams BLOCK_N rows of B; D is covered in BLOCK_K slices (any D). The grad
kernel's second grid axis splits dA's columns in BLOCK_DV slices, each program recomputing the logits of its rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_flags, interpreting, traceable

# ---------------------------------------------------------------------------------------------------- constants

CLIP, SIGLIP = 0, 1
LOSS_KINDS = {"clip": CLIP, "siglip": SIGLIP}

# Interpreter: small tiles so that N = 37 covers several row and column tiles plus their tails.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_DV": 16}
# CUDA: one fixed config per kernel (BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_DV, num_warps, num_stages). Chosen from the
# FA2-style forward space (64 x 64 tiles, K slices of 64); not measured here (no GPU when this file was written).
CUDA_STATS_CONFIG = (64, 64, 64, None, 4, 3)
CUDA_GRAD_CONFIG = (64, 64, 64, 128, 4, 2)


# ---------------------------------------------------------------------------------------------------- jit helpers


@triton.jit
def _logits_tile(
    A, B, offs_m, offs_n, m_ok, n_ok, stride_a, stride_b, D,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """(BLOCK_M, BLOCK_N) fp32 tile of A @ B^T, K covered in BLOCK_K slices; rows/cols out of range give 0."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        a = tl.load(A + offs_m[:, None] * stride_a + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(B + offs_n[:, None] * stride_b + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _log1p(x):
    """log(1 + x) for x > -0.25, accurate near 0 (log(1 + x) is 0 for x below fp32 epsilon).

    |x| < 0.25: 2 atanh(w) with w = x / (2 + x), |w| < 0.143, series to w^9 (next term < 3e-9 relative); else
    log(1 + x) >= 0.22, where log's absolute error is small relative to the result."""
    w = x / (2.0 + x)
    w2 = w * w
    series = 2.0 * w * (1.0 + w2 * (1.0 / 3.0 + w2 * (1.0 / 5.0 + w2 * (1.0 / 7.0 + w2 * (1.0 / 9.0)))))
    return tl.where(tl.abs(x) < 0.25, series, tl.log(1.0 + x))


@triton.jit
def _softplus(x):
    """log(1 + exp(x)), overflow-free and accurate for very negative x: max(x, 0) + log1p(exp(-|x|))."""
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _positive_logit(
    A, B, offs_m, m_ok, stride_a, stride_b, D, offset, n_b, scale, bias, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):  # fmt: skip
    """(BLOCK_M,) fp32 z_ip = scale * A_i . B_{i + offset} + bias, the K loop in fp32 (0 where out of range)."""
    p_ok = m_ok & (offs_m + offset < n_b)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        a = tl.load(A + offs_m[:, None] * stride_a + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(
            B + (offs_m + offset)[:, None] * stride_b + offs_k[None, :], mask=p_ok[:, None] & k_ok[None, :], other=0.0
        )
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), 1)
    return acc * scale + bias


# ---------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _contrastive_stats_kernel(
    A,  # (N_a, D), last dim stride 1
    B,  # (N_b, D), last dim stride 1
    Stat,  # (N_a,) fp32 out: CLIP row loss term r = LSE - z_ip, SigLIP row sum of -logsigmoid(y z)
    stride_a,
    stride_b,
    n_a,
    n_b,
    D,
    offset,  # positive of row i is column i + offset
    scale,
    bias,
    LOSS: tl.constexpr,  # CLIP or SIGLIP
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < n_a
    # CLIP: running max m_i of u = z - z_ip over the negatives, floored at 0 (the positive's u is 0), and running
    # sum of exp(u - m_i) over the negatives; SigLIP: running loss sum.
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    if LOSS == 0:
        z_pos = _positive_logit(
            A, B, offs_m, m_ok, stride_a, stride_b, D, offset, n_b, scale, bias, BLOCK_M, BLOCK_K
        )  # fmt: skip
    for n0 in range(0, n_b, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_b
        z = _logits_tile(
            A, B, offs_m, offs_n, m_ok, n_ok, stride_a, stride_b, D,
            DOT_FP32, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        ) * scale + bias  # fmt: skip
        pos = offs_n[None, :] == offs_m[:, None] + offset
        if LOSS == 0:
            u = tl.where(n_ok[None, :], z - z_pos[:, None], float("-inf"))
            u = tl.where(pos, float("-inf"), u)  # the positive is the exp(0) = 1 kept apart
            m_new = tl.maximum(m_i, tl.max(u, 1))
            acc = acc * tl.exp(m_i - m_new) + tl.sum(tl.exp(u - m_new[:, None]), 1)
            m_i = m_new
        else:
            yz = tl.where(pos, z, -z)
            acc += tl.sum(tl.where(n_ok[None, :], _softplus(-yz), 0.0), 1)  # -logsigmoid(yz) = softplus(-yz)
    if LOSS == 0:
        out = tl.where(m_i > 0, m_i + tl.log(tl.exp(-m_i) + acc), _log1p(acc))
    else:
        out = acc
    tl.store(Stat + offs_m, out, mask=m_ok)


@triton.jit
def _contrastive_grad_kernel(
    A,  # (N_a, D), last dim stride 1
    B,  # (N_b, D), last dim stride 1
    StatA,  # (N_a,) fp32: CLIP row LSE of A's rows, r + z_ip (unused for SigLIP)
    StatB,  # (N_b,) fp32: CLIP row LSE of B's rows, i.e. the column LSE (unused for SigLIP)
    DA,  # (N_a, D) fp32 out
    DS,  # (N_a,) fp32 out: coef * sum_j g_ij (A_i . B_j)
    DB,  # (N_a,) fp32 out: coef * sum_j g_ij
    stride_a,
    stride_b,
    stride_da,
    n_a,
    n_b,
    D,
    offset,
    scale,
    bias,
    coef,
    LOSS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid_v = tl.program_id(1)
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_ok = offs_m < n_a
    v_ok = offs_v < D
    if LOSS == 0:
        lse_a = tl.load(StatA + offs_m, mask=m_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    ds_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    db_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, n_b, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_b
        dots = _logits_tile(
            A, B, offs_m, offs_n, m_ok, n_ok, stride_a, stride_b, D,
            DOT_FP32, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        z = dots * scale + bias
        pos = offs_n[None, :] == offs_m[:, None] + offset
        if LOSS == 0:
            lse_b = tl.load(StatB + offs_n, mask=n_ok, other=0.0)
            # out-of-range entries and the positive get exp(-inf) = 0 (the padded z = 0 would overflow exp(z - lse)
            # when lse << 0); the positive's g is added by the caller from the precise row terms
            neg = offs_n[None, :] != offs_m[:, None] + offset
            z = tl.where(m_ok[:, None] & n_ok[None, :] & neg, z, float("-inf"))
            g = tl.exp(z - lse_a[:, None]) + tl.exp(z - lse_b[None, :])
        else:
            yz = tl.where(pos, z, -z)
            sig = tl.sigmoid(-yz)
            g = tl.where(pos, -sig, sig)
        g = tl.where(m_ok[:, None] & n_ok[None, :], g, 0.0)
        ds_i += tl.sum(g * dots, 1)
        db_i += tl.sum(g, 1)
        bv = tl.load(B + offs_n[:, None] * stride_b + offs_v[None, :], mask=n_ok[:, None] & v_ok[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(g, bv.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(g.to(bv.dtype), bv, acc, input_precision=DOT_PRECISION)
    tl.store(
        DA + offs_m[:, None] * stride_da + offs_v[None, :], acc * (coef * scale), mask=m_ok[:, None] & v_ok[None, :]
    )
    if pid_v == 0:
        tl.store(DS + offs_m, ds_i * coef, mask=m_ok)
        tl.store(DB + offs_m, db_i * coef, mask=m_ok)


# ---------------------------------------------------------------------------------------------------- launchers


def contrastive_unsupported_reason(a: torch.Tensor) -> str | None:
    """None if the contrastive kernels handle these inputs, else a short reason."""
    if a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {a.dtype} is not fp32/fp16/bf16"
    if a.device.type != "cuda" and not (a.device.type == "cpu" and interpreting()):
        return f"device {a.device} needs CUDA or TRITON_INTERPRET=1"
    return None


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _config(cuda_config):
    if interpreting():
        return dict(INTERPRETER_CONFIG), {}
    bm, bn, bk, bdv, warps, stages = cuda_config
    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    if bdv is not None:
        cfg["BLOCK_DV"] = bdv
    return cfg, {"num_warps": warps, "num_stages": stages}


def contrastive_row_stats(
    kind: str, a: torch.Tensor, b: torch.Tensor, *, scale: float, bias: float = 0.0, offset: int = 0
) -> torch.Tensor:
    """(N_a,) fp32 row statistics of z = scale * a @ b.T + bias (see the module docstring)."""
    n_a, d = a.shape
    if kind == "clip" and offset + n_a > b.shape[0]:
        raise ValueError(f"clip row stats need every row's positive in b: offset {offset} + {n_a} rows > {b.shape[0]}")
    stat = torch.empty(n_a, dtype=torch.float32, device=a.device)
    if n_a == 0:
        return stat
    a, b = _contig(a), _contig(b)
    dot_fp32, precision = dot_flags(a.dtype)
    cfg, launch = _config(CUDA_STATS_CONFIG)
    cfg.pop("BLOCK_DV", None)
    grid = (triton.cdiv(n_a, cfg["BLOCK_M"]),)
    args = (a, b, stat, a.stride(0), b.stride(0), n_a, b.shape[0], d, offset, float(scale), float(bias))
    meta = dict(LOSS=LOSS_KINDS[kind], DOT_FP32=dot_fp32, DOT_PRECISION=precision, **cfg, **launch)
    if interpreting():
        _contrastive_stats_kernel[grid](*args, **meta)
    else:
        with torch.cuda.device(a.device):
            traceable(_contrastive_stats_kernel)[grid](*args, **meta)
    return stat


def contrastive_row_grads(
    kind: str,
    a: torch.Tensor,
    b: torch.Tensor,
    stat_a: torch.Tensor | None,
    stat_b: torch.Tensor | None,
    *,
    scale: float,
    bias: float = 0.0,
    offset: int = 0,
    coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dA (N_a, D) fp32, ds rows (N_a,) fp32, db rows (N_a,) fp32); see the module docstring."""
    n_a, d = a.shape
    da = torch.empty(n_a, d, dtype=torch.float32, device=a.device)
    ds = torch.empty(n_a, dtype=torch.float32, device=a.device)
    db = torch.empty(n_a, dtype=torch.float32, device=a.device)
    if n_a == 0:
        return da, ds, db
    a, b = _contig(a), _contig(b)
    if stat_a is None:
        stat_a, stat_b = ds, ds  # dummy pointers, never read (SigLIP)
    dot_fp32, precision = dot_flags(a.dtype)
    cfg, launch = _config(CUDA_GRAD_CONFIG)
    grid = (triton.cdiv(n_a, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_DV"]))
    args = (
        a, b, stat_a.contiguous(), stat_b.contiguous(), da, ds, db, a.stride(0), b.stride(0), da.stride(0),
        n_a, b.shape[0], d, offset, float(scale), float(bias), float(coef),
    )  # fmt: skip
    meta = dict(LOSS=LOSS_KINDS[kind], DOT_FP32=dot_fp32, DOT_PRECISION=precision, **cfg, **launch)
    if interpreting():
        _contrastive_grad_kernel[grid](*args, **meta)
    else:
        with torch.cuda.device(a.device):
            traceable(_contrastive_grad_kernel)[grid](*args, **meta)
    return da, ds, db

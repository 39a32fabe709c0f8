"""Bias + activation, and gated activation, elementwise over a (rows, N) view; fp32 math, output in the input dtype.

    bias_activation:  y = act(x + bias)          x: (..., N), bias: (N,) or None
    gated_activation: y = act(gate) * up         gate, up: (..., N), same shape and dtype (T5 gated-gelu FFN)

    quick_gelu: x * sigmoid(1.702 x)
    gelu:       0.5 x (1 + erf(x / sqrt(2)))
    gelu_tanh:  0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))  ==  x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))
    relu:       max(x, 0), NaN stays NaN

Backward, with h = x + bias (fp32) and act' the activation's derivative:

    bias_activation:  dx = dy * act'(h)  (relu: dy where h > 0, else 0, as torch's threshold_backward; NaN h gives 0)
                      dbias = sum_rows(dx in fp32): per-program partial sums over a range of row blocks, then .sum(0)
    gated_activation: dgate = dy * up * act'(gate),  dup = dy * act(gate)

    quick_gelu': s + 1.702 x s (1 - s),  s = sigmoid(1.702 x)
    gelu':       0.5 (1 + erf(x / sqrt(2))) + x exp(-x^2 / 2) / sqrt(2 pi)
    gelu_tanh':  p + x p (1 - p) 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2),  p = sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))

Each program handles a BLOCK_M x BLOCK_N tile (2-D grid: row blocks on axis 0, column blocks on axis 1), so any N
works (3072, 5120, 2730, 37) and the bias tile is loaded once per program and reused across BLOCK_M rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _round_to, on_device, traceable
from .norm import reduction_programs

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh", "relu")

SQRT_8_OVER_PI = tl.constexpr(1.5957691216057308)  # 2 sqrt(2 / pi): gelu_tanh's sigmoid argument scale
INV_SQRT_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi): the normal density's scale

# Tile shape: columns up to MAX_BLOCK_N wide, rows so a tile holds about TILE_ELEMENTS elements.
MAX_BLOCK_N = 1024
TILE_ELEMENTS = 4096
NUM_WARPS = 4
MAX_GRID_AXIS_1 = 65535  # CUDA's limit on grid dims y and z


def _elementwise_config(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a (rows, n) elementwise kernel."""
    block_n = min(triton.next_power_of_2(n), MAX_BLOCK_N)
    return max(1, TILE_ELEMENTS // block_n), block_n, NUM_WARPS


@triton.jit
def _apply_activation(x, ACTIVATION: tl.constexpr):
    """act(x) for fp32 x, ACTIVATION one of ACTIVATIONS. Constants multiply from the right: under the interpreter a
    constexpr on the left of a tensor does not broadcast.

    NOTE: tl.math has no tanh in Triton 3.9 (neither under the interpreter nor portably on CUDA), and the identity
    0.5 (1 + tanh(u)) = sigmoid(2u) makes gelu_tanh one sigmoid, with no 1 + tanh cancellation for negative x.
    """
    if ACTIVATION == "quick_gelu":
        return x * tl.sigmoid(1.702 * x)
    elif ACTIVATION == "gelu":
        return 0.5 * x * (1.0 + tl.math.erf(x * INV_SQRT_2))
    elif ACTIVATION == "gelu_tanh":
        return x * tl.sigmoid((x + 0.044715 * x * x * x) * SQRT_8_OVER_PI)
    else:  # relu; NaN stays NaN as in torch.relu (plain tl.maximum drops NaN: fmaxf on CUDA, np.fmax interpreted)
        return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _activation_grad(x, dy, ACTIVATION: tl.constexpr):
    """dy * act'(x) for fp32 x and dy. Products whose factors can be 0 and inf at once (far tails) are guarded: the
    derivative there is exactly 1 or 0, never NaN from 0 * inf (float64 autograd gives the same 1 or 0)."""
    if ACTIVATION == "quick_gelu":
        s = tl.sigmoid(1.702 * x)
        q = s * tl.sigmoid(-1.702 * x)  # s (1 - s) without the cancellation in 1 - s near s = 1
        return dy * (s + x * (q * 1.702))  # x * (...) last: q == 0 where 1.702 x overflows
    elif ACTIVATION == "gelu":
        return dy * (0.5 * (1.0 + tl.math.erf(x * INV_SQRT_2)) + x * tl.exp(-0.5 * x * x) * INV_SQRT_2PI)
    elif ACTIVATION == "gelu_tanh":
        u = (x + 0.044715 * x * x * x) * SQRT_8_OVER_PI
        p = tl.sigmoid(u)
        q = p * tl.sigmoid(-u)  # p (1 - p) without the cancellation in 1 - p near p = 1
        return dy * (p + tl.where(q > 0.0, q * (x + 0.134145 * x * x * x) * SQRT_8_OVER_PI, 0.0))  # x^3 may be inf
    else:  # relu: threshold_backward's rule, so dy's NaN / inf never leak where h <= 0
        return tl.where(x > 0.0, dy, 0.0)


@triton.jit
def _tile(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(rows (BLOCK_M, 1) int64, cols (1, BLOCK_N), mask (BLOCK_M, BLOCK_N)) of one tile."""
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    return rows[:, None], cols[None, :], mask


@triton.jit
def _bias_activation_fwd_kernel(
    X, BIAS, Y,  # X: (M, N) row-strided; BIAS: (N,) any float dtype; Y: (M, N) contiguous, x.dtype
    stride_x,
    M, N,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """y = act(x + bias) on one BLOCK_M x BLOCK_N tile; fp32 math, rounded once to Y's dtype."""
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), M, N, BLOCK_M, BLOCK_N)
    h = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = _apply_activation(h, ACTIVATION)
    tl.store(Y + rows * N + cols, _round_to(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _gated_activation_fwd_kernel(
    GATE, UP, Y,  # GATE, UP: (M, N) row-strided, same dtype; Y: (M, N) contiguous, same dtype
    stride_gate, stride_up,
    M, N,
    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """y = act(gate) * up on one BLOCK_M x BLOCK_N tile; fp32 math, rounded once to Y's dtype."""
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), M, N, BLOCK_M, BLOCK_N)
    gate = tl.load(GATE + rows * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + rows * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    y = _apply_activation(gate, ACTIVATION) * up
    tl.store(Y + rows * N + cols, _round_to(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_activation_bwd_kernel(
    DY, X, BIAS, DX, DB,  # DY, X: (M, N) row-strided; BIAS: (N,); DX: (M, N) contiguous, x.dtype
    stride_dy, stride_x,  # DB: (programs on axis 0, N) fp32 partial sums of dx over each program's rows
    M, N, blocks_per_program,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dx = dy * act'(x + bias) over blocks_per_program row blocks of one column block; with a bias, the column sums
    of dx (fp32, before rounding) accumulate in registers and are stored once per program."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(0, blocks_per_program):
        rows, cols2, mask = _tile(pid_m * blocks_per_program + i, pid_n, M, N, BLOCK_M, BLOCK_N)
        h = tl.load(X + rows * stride_x + cols2, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h += bias[None, :]
        dy = tl.load(DY + rows * stride_dy + cols2, mask=mask, other=0.0).to(tl.float32)
        dx = _activation_grad(h, dy, ACTIVATION)
        tl.store(DX + rows * N + cols2, _round_to(dx, DX.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            db += tl.sum(tl.where(mask, dx, 0.0), axis=0)  # masked lanes may hold 0 * act'(NaN bias)
    if HAS_BIAS:
        tl.store(DB + pid_m * N + cols, db, mask=cols < N)


@triton.jit
def _gated_activation_bwd_kernel(
    DY, GATE, UP, DGATE, DUP,  # DY, GATE, UP: (M, N) row-strided; DGATE, DUP: (M, N) contiguous, gate's dtype
    stride_dy, stride_gate, stride_up,
    M, N,
    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dgate = dy * up * act'(gate), dup = dy * act(gate) on one BLOCK_M x BLOCK_N tile; fp32 math, rounded once."""
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), M, N, BLOCK_M, BLOCK_N)
    gate = tl.load(GATE + rows * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + rows * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    dgate = _activation_grad(gate, dy * up, ACTIVATION)
    dup = dy * _apply_activation(gate, ACTIVATION)
    tl.store(DGATE + rows * N + cols, _round_to(dgate, DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + rows * N + cols, _round_to(dup, DUP.dtype.element_ty), mask=mask)


def _activation_rows(t: torch.Tensor) -> torch.Tensor:
    """t (..., N) as a (rows, N) view with unit column stride (a 0-d t is one element); copies only when needed."""
    if t.dim() == 0 or t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1] if t.dim() else 1)


def _grid(m: int, n: int) -> tuple[tuple[int, int], int, int, int]:
    block_m, block_n, num_warps = _elementwise_config(n)
    return (triton.cdiv(m, block_m), triton.cdiv(n, block_n)), block_m, block_n, num_warps


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def bias_activation_unsupported_reason(x: torch.Tensor) -> str | None:
    """None if bias_activation_forward can run on x, else why not (only a last dim too wide for CUDA's grid)."""
    n = x.shape[-1] if x.dim() else 1
    if triton.cdiv(n, MAX_BLOCK_N) > MAX_GRID_AXIS_1:
        return f"last dim {n} needs more than {MAX_GRID_AXIS_1} column blocks of {MAX_BLOCK_N}"
    return None


def bias_activation_forward(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """act(x + bias) with fp32 math, output in x.dtype and x's shape. x: (..., N); bias: (N,) or None."""
    _check_activation(activation)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:  # before _rows: (..., 0) has no (-1, 0) view
        return y
    x2 = _activation_rows(x)
    m, n = x2.shape
    bias = None if bias is None else bias.contiguous()
    grid, block_m, block_n, num_warps = _grid(m, n)
    with on_device(x):
        traceable(_bias_activation_fwd_kernel)[grid](
            x2, x2 if bias is None else bias, y,
            x2.stride(0),
            m, n,
            ACTIVATION=activation, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
    return y


def gated_activation_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up with fp32 math, output in gate's dtype and shape. gate, up: (..., N), same shape and dtype."""
    _check_activation(activation)
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(
            f"gate and up must match in shape, dtype and device, got {tuple(gate.shape)} {gate.dtype} {gate.device} "
            f"and {tuple(up.shape)} {up.dtype} {up.device}"
        )
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if y.numel() == 0:  # before _rows: (..., 0) has no (-1, 0) view
        return y
    g2, u2 = _activation_rows(gate), _activation_rows(up)
    m, n = g2.shape
    grid, block_m, block_n, num_warps = _grid(m, n)
    with on_device(gate):
        traceable(_gated_activation_fwd_kernel)[grid](
            g2, u2, y,
            g2.stride(0), u2.stride(0),
            m, n,
            ACTIVATION=activation, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
    return y


# ---------------------------------------------------------------------------------------------------- backward


def _bias_grid(m: int, n: int, device: torch.device) -> tuple[tuple[int, int], int, int, int, int]:
    """(grid, blocks_per_program, BLOCK_M, BLOCK_N, num_warps) of the bias_activation backward with a bias: about
    2 x reduction_programs(device) programs in all on CUDA (4-warp tiles; not tuned on a GPU yet), as many as
    reduction_programs on the interpreter, each over a contiguous range of row blocks, so the dbias partial sums stay
    (programs on axis 0, N) whatever the row count."""
    block_m, block_n, num_warps = _elementwise_config(n)
    m_blocks, n_blocks = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
    budget = 2 * reduction_programs(device) if device.type == "cuda" else reduction_programs(device)
    programs_m = min(m_blocks, max(1, budget // n_blocks))
    blocks_per_program = triton.cdiv(m_blocks, programs_m)
    return (triton.cdiv(m_blocks, blocks_per_program), n_blocks), blocks_per_program, block_m, block_n, num_warps


def bias_activation_backward(
    dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx, dbias) of `bias_activation_forward`: dx in x.dtype and x's shape, dbias (None without a bias) summed in
    fp32 and returned in bias's dtype. dy: like x."""
    _check_activation(activation)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if dx.numel() == 0:
        return dx, None if bias is None else torch.zeros_like(bias)
    x2, dy2 = _activation_rows(x), _activation_rows(dy)
    m, n = x2.shape
    if bias is None:
        grid, block_m, block_n, num_warps = _grid(m, n)
        blocks_per_program, partial = 1, None
    else:
        bias = bias.contiguous()
        grid, blocks_per_program, block_m, block_n, num_warps = _bias_grid(m, n, x.device)
        partial = torch.empty(grid[0], n, dtype=torch.float32, device=x.device)
    with on_device(x):
        traceable(_bias_activation_bwd_kernel)[grid](
            dy2, x2, x2 if bias is None else bias, dx, dx if partial is None else partial,
            dy2.stride(0), x2.stride(0),
            m, n, blocks_per_program,
            ACTIVATION=activation, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
    return dx, None if partial is None else partial.sum(0).to(bias.dtype)


def gated_activation_backward(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) of `gated_activation_forward`, each contiguous in gate's shape and dtype. dy: like gate."""
    _check_activation(activation)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if dgate.numel() == 0:
        return dgate, dup
    g2, u2, dy2 = _activation_rows(gate), _activation_rows(up), _activation_rows(dy)
    m, n = g2.shape
    grid, block_m, block_n, num_warps = _grid(m, n)
    with on_device(gate):
        traceable(_gated_activation_bwd_kernel)[grid](
            dy2, g2, u2, dgate, dup,
            dy2.stride(0), g2.stride(0), u2.stride(0),
            m, n,
            ACTIVATION=activation, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
    return dgate, dup

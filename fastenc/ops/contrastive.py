"""fastenc.ops.clip_loss and fastenc.ops.siglip_loss: contrastive losses that never materialise the N x N logits.

    clip_loss   = (CE(s * I @ T.T, arange) + CE((s * I @ T.T).T, arange)) / 2
    siglip_loss = -sum(logsigmoid(labels * (s * I @ T.T + b))) / N,   labels = 2 * eye(N) - 1

s (logit_scale) is the multiplier, already exp'd; features are used as given (the caller normalises, as open_clip).
On every backend the loss is a `torch.autograd.Function` built from two row-wise primitives (see
kernels/contrastive.py for the math): forward keeps only O(N) statistics (CLIP: row and column logsumexp), backward
recomputes the logit tiles. The torch path tiles over row blocks of `tile_rows(N)` rows, so its peak memory is
O(N * d + tile * N) (measured: +190 MiB RSS for forward + backward at N = 16384, d = 256 fp32, where the N x N fp32
logits alone are 1 GiB); the Triton path holds one (BLOCK_M, BLOCK_N) tile per program.
Single-process torch runs one sweep per pass (column LSEs merged across row blocks with logaddexp, dT accumulated
as G^T @ I per block: 1 matmul forward, 3 backward). The Triton kernels and `fastenc.distributed` use the row-wise
primitives instead (A's rows vs all of B; for distributed, A is this rank's shard and B the gathered batch): 2
matmuls forward for CLIP, 4 backward, no atomics.
logit_scale / logit_bias tensors are read with float() (a device sync on CUDA) and passed to the kernels as scalars.
Precision near a zero loss, every backend: CLIP's per-row terms are logsumexp_j(z_ij - z_ii) in log1p form, SigLIP's
softplus(-y z) per entry in log1p form (no lse - z_ii or softplus(z) + correction cancellation), and CLIP's positive
entries of the gradient are expm1 of those terms; fp32 loss and gradients stay within ~1e-6 relative of float64 at
losses of 1e-8 (tests/test_contrastive.py::test_fp32_precision_near_zero_loss). An N = 1 CLIP loss is exactly 0.
No double backward: gradients taken with create_graph=True are right, differentiating them raises
DoubleBackwardError.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.dispatch import choose_backend
from ..core.errors import DoubleBackwardError, InputError
from ._common import FLOAT_DTYPES, check_tensor
from ._library import OpSpec, add_ops, fastenc_op

# Torch path: one row block of the logits holds at most this many fp32 elements (16 MiB); a handful of temporaries
# of that size live at once, so peak extra memory is ~100 MiB whatever N.
TILE_ELEMENTS = 1 << 22


def tile_rows(n_cols: int) -> int:
    """Rows per block on the torch path: TILE_ELEMENTS // n_cols, at least 1."""
    return max(1, TILE_ELEMENTS // max(1, n_cols))


# ---------------------------------------------------------------------------------------------------- references


def clip_loss_reference(image_features, text_features, logit_scale):
    """open_clip's formula: materialises the (N, N) logits. fp32 math, fp32 result."""
    logits = logit_scale * image_features.float() @ text_features.float().T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def siglip_loss_reference(image_features, text_features, logit_scale, logit_bias):
    """big_vision's sigmoid loss: materialises the (N, N) logits. fp32 math, fp32 result."""
    logits = logit_scale * image_features.float() @ text_features.float().T + logit_bias
    n = logits.shape[0]
    labels = 2 * torch.eye(n, device=logits.device) - 1
    return -F.logsigmoid(labels * logits).sum() / n


# ---------------------------------------------------------------------------------------------------- torch primitives


def _diag_index(r0: int, r1: int, offset: int, n_cols: int, device):
    """(rows within the block, columns) of the positives of global rows [r0, r1) + offset that exist in B."""
    rows = torch.arange(r0, r1, device=device)
    cols = rows + offset
    keep = cols < n_cols
    return rows[keep] - r0, cols[keep]


def _block_terms(z: torch.Tensor, z_pos: torch.Tensor, dim: int, buf: torch.Tensor):
    """For the logits block z (positives already set to -inf) and the positives' logits z_pos along the other dim:
    (m, acc) with m = max(0, max(z - z_pos)) and acc = sum exp(z - z_pos - m) over dim, i.e. the loss terms
    log(1 + sum exp(z - z_pos)) = finish(m, acc) without the lse - z_pos cancellation (see kernels/contrastive.py).
    Two passes over the block besides the max: exp(z - (z_pos + m)) written into buf, then its sum (z_pos + m
    rounds like z itself, ~|z| * 6e-8, so this is as precise as subtracting z_pos first)."""
    m = (z.amax(dim) - z_pos).clamp_min_(0.0)
    acc = torch.sub(z, (z_pos + m).unsqueeze(dim), out=buf).exp_().sum(dim)
    return m, acc


def _finish_lse_terms(m: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """log(exp(-m) + acc) + m, as log1p(acc) where m == 0 (the positive dominates: the result is near 0)."""
    return torch.where(m > 0, m + torch.log(torch.exp(-m) + acc), torch.log1p(acc))


def _check_positives(kind: str, n_a: int, n_b: int, offset: int) -> None:
    if kind == "clip" and offset + n_a > n_b:
        raise ValueError(f"clip row stats need every row's positive in b: offset {offset} + {n_a} rows > {n_b}")


def torch_row_stats(kind: str, a, b, *, scale: float, bias: float = 0.0, offset: int = 0) -> torch.Tensor:
    """Torch twin of kernels.contrastive.contrastive_row_stats, tiled over row blocks of a: CLIP row loss terms
    r_i = lse_i - z_ip (computed without cancellation), SigLIP row sums of softplus(-y z)."""
    a32, b32 = a.float(), b.float()
    n_a, n_b = a.shape[0], b.shape[0]
    _check_positives(kind, n_a, n_b, offset)
    out = torch.empty(n_a, dtype=torch.float32, device=a.device)
    step = tile_rows(n_b)
    for r0 in range(0, n_a, step):
        r1 = min(n_a, r0 + step)
        z = a32[r0:r1] @ b32.T  # (t, N_b)
        z.mul_(scale).add_(bias)
        ri, ci = _diag_index(r0, r1, offset, n_b, a.device)
        if kind == "clip":
            z_pos = z[ri, ci]  # every row has its positive (checked above)
            z[ri, ci] = float("-inf")
            out[r0:r1] = _finish_lse_terms(*_block_terms(z, z_pos, 1, torch.empty_like(z)))
        else:
            # -logsigmoid(y z) = softplus(-y z): softplus(z) for the negatives, softplus(-z) for the positives, each
            # term computed directly (summing softplus(z) over all and correcting the positives cancels)
            z[ri, ci] = -z[ri, ci]
            out[r0:r1] = F.softplus(z).sum(1)
        del z
    return out


def torch_row_grads(kind: str, a, b, stat_a, stat_b, *, scale: float, bias: float = 0.0, offset: int = 0, coef: float):
    """Torch twin of kernels.contrastive.contrastive_row_grads: (dA fp32, ds rows, db rows). CLIP's positive entries
    are left out (g = 0 there); the caller adds them (see ContrastiveLossFunction.backward)."""
    a32, b32 = a.float(), b.float()
    n_a, n_b = a.shape[0], b.shape[0]
    da = torch.empty(n_a, a.shape[1], dtype=torch.float32, device=a.device)
    ds = torch.empty(n_a, dtype=torch.float32, device=a.device)
    db = torch.empty(n_a, dtype=torch.float32, device=a.device)
    step = tile_rows(n_b)
    for r0 in range(0, n_a, step):
        r1 = min(n_a, r0 + step)
        dots = a32[r0:r1] @ b32.T  # (t, N_b)
        z = dots * scale + bias
        ri, ci = _diag_index(r0, r1, offset, n_b, a.device)
        if kind == "clip":
            g = torch.exp(z - stat_a[r0:r1, None])
            g += z.sub_(stat_b[None, :]).exp_()
            g[ri, ci] = 0.0
        else:
            zd = z[ri, ci]
            g = torch.sigmoid(z)  # negatives (y = -1): -y * sigmoid(-y z) = sigmoid(z)
            g[ri, ci] = -torch.sigmoid(-zd)  # positives: -sigmoid(-z)
        del z
        ds[r0:r1] = (g * dots).sum(1)
        db[r0:r1] = g.sum(1)
        del dots
        da[r0:r1] = g @ b32
        del g
    da.mul_(coef * scale)
    ds.mul_(coef)
    db.mul_(coef)
    return da, ds, db


def torch_fused_clip_stats(image, text, *, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-process torch path: (row loss terms, column loss terms) of z = scale * I @ T^T, r = lse - z_ii without
    cancellation, in one sweep over row blocks (one matmul instead of the two the row primitive needs); the column
    terms are folded across blocks online (running max >= 0 and sum of exp over the negatives)."""
    i32, t32 = image.float(), text.float()
    n = i32.shape[0]
    z_pos = (i32 * t32).sum(1).mul_(scale)  # (N,) positives, only subtracted: the positives themselves are masked
    r_row = torch.empty(n, dtype=torch.float32, device=image.device)
    m_c = torch.zeros(n, dtype=torch.float32, device=image.device)
    acc_c = torch.zeros(n, dtype=torch.float32, device=image.device)
    step = tile_rows(n)
    buf = torch.empty(min(step, n), n, dtype=torch.float32, device=image.device)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        z = (i32[r0:r1] @ t32.T).mul_(scale)  # (t, N)
        ri, ci = _diag_index(r0, r1, 0, n, image.device)
        z[ri, ci] = float("-inf")
        r_row[r0:r1] = _finish_lse_terms(*_block_terms(z, z_pos[r0:r1], 1, buf[: r1 - r0]))
        m_b, acc_b = _block_terms(z, z_pos, 0, buf[: r1 - r0])
        m_new = torch.maximum(m_c, m_b)
        acc_c = acc_c * torch.exp(m_c - m_new) + acc_b * torch.exp(m_b - m_new)
        m_c = m_new
        del z
    return r_row, _finish_lse_terms(m_c, acc_c)


def torch_fused_grads(kind: str, image, text, lse_r, lse_c, *, scale: float, bias: float, coef: float):
    """Single-process torch path: (dI, dT, ds, db) in one sweep over row blocks: per block one recompute of the
    logits, dI_blk = G_blk @ T and dT += G_blk^T @ I_blk (3 matmuls in all instead of 4). CLIP's positive entries are
    left out, as in torch_row_grads."""
    i32, t32 = image.float(), text.float()
    n = i32.shape[0]
    di = torch.empty_like(i32)
    dt = torch.zeros_like(t32)
    ds = torch.zeros((), dtype=torch.float32, device=image.device)
    db = torch.zeros((), dtype=torch.float32, device=image.device)
    step = tile_rows(n)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        dots = i32[r0:r1] @ t32.T  # (t, N)
        z = dots * scale + bias
        ri, ci = _diag_index(r0, r1, 0, n, image.device)
        if kind == "clip":
            g = torch.exp(z - lse_r[r0:r1, None])
            g += z.sub_(lse_c[None, :]).exp_()
            g[ri, ci] = 0.0
        else:
            zd = z[ri, ci]
            g = torch.sigmoid(z)
            g[ri, ci] = -torch.sigmoid(-zd)
        del z
        ds += (g * dots).sum()
        db += g.sum()
        del dots
        di[r0:r1] = g @ t32
        dt.addmm_(g.T, i32[r0:r1])
        del g
    return di.mul_(coef * scale), dt.mul_(coef * scale), ds * coef, db * coef


def _primitives(backend: str):
    if backend == "torch":
        return torch_row_stats, torch_row_grads
    stats_op, grads_op = fastenc_op("contrastive_row_stats"), fastenc_op("contrastive_row_grads")

    def row_stats(kind, a, b, *, scale, bias=0.0, offset=0):
        return stats_op(kind, a, b, float(scale), float(bias), int(offset))

    def row_grads(kind, a, b, stat_a, stat_b, *, scale, bias=0.0, offset=0, coef):
        return tuple(grads_op(kind, a, b, stat_a, stat_b, float(scale), float(bias), int(offset), float(coef)))

    return row_stats, row_grads


# ---------------------------------------------------------------------------------------------------- autograd


class LocalComm:
    """Single process: this 'rank' holds the whole batch. fastenc.distributed supplies the multi-rank twin.

    feature_grad_scale / scalar_grad_scale multiply the gradients handed to the features and to logit_scale /
    logit_bias (the data-parallel convention, see fastenc.distributed); 1 in a single process."""

    offset = 0
    feature_grad_scale = 1.0
    scalar_grad_scale = 1.0

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def total(self, n_local: int) -> int:
        return n_local


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on a gradient the loss returned under create_graph=True; differentiating it raises
    DoubleBackwardError. Its inputs after the first are the loss's differentiable inputs, so the node lies on every
    path a second derivative would take (autograd never prunes it away silently)."""

    @staticmethod
    def forward(ctx, grad, *inputs):
        return grad.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise DoubleBackwardError(
            "fastenc clip_loss / siglip_loss do not support double backward: their gradients were computed with "
            "create_graph=True (that works) but are not differentiable themselves; compute second-order terms with "
            "fastenc.ops.contrastive.clip_loss_reference / siglip_loss_reference"
        )


class ContrastiveLossFunction(torch.autograd.Function):
    """Tiled CLIP / SigLIP loss. Inputs: this rank's (image, text) rows; returns the loss of the global batch.

    Forward: CLIP row loss terms r = lse - z_ii of (I_local vs T_all) and column terms (T_local vs I_all), computed
    without the lse - z_ii cancellation, and the LSEs r + z_ii gathered to O(N) vectors for the backward; SigLIP
    row sums. Backward: dI_local from (I_local, T_all), dT_local from (T_local, I_all), recomputing the tiles; CLIP's
    positive entries g_ii = expm1(-r_row_i) + expm1(-r_col_i) are added here from the precise r (an O(N d) term);
    the scalar grads are all-reduced so every rank gets the full dL/ds, dL/db. The results are multiplied by
    comm.feature_grad_scale / comm.scalar_grad_scale (fastenc.distributed's data-parallel convention).
    Double backward is not supported: under create_graph=True the gradients come back wrapped so that
    differentiating them raises DoubleBackwardError.
    """

    @staticmethod
    def forward(ctx, kind, backend, comm, image, text, logit_scale, logit_bias):
        row_stats, _ = _primitives(backend)
        s = float(logit_scale)
        b = float(logit_bias) if logit_bias is not None else 0.0
        img_all, txt_all = comm.gather(image), comm.gather(text)
        n = img_all.shape[0]
        off = comm.offset
        fused = backend == "torch" and isinstance(comm, LocalComm)  # one sweep instead of two
        if kind == "clip":
            if fused:
                r_row, r_col = torch_fused_clip_stats(image, text, scale=s)
            else:
                r_row = row_stats("clip", image, txt_all, scale=s, offset=off)  # (n_local,)
                r_col = row_stats("clip", text, img_all, scale=s, offset=off)
            dots = (image.float() * text.float()).sum(1)  # (n_local,) positive pairs' dot products
            loss = comm.all_reduce((r_row.sum() + r_col.sum()).reshape(1))[0] / (2 * n)
            lse_r, lse_c = r_row + s * dots, r_col + s * dots  # the LSEs the backward's off-diagonal terms need
            ctx.stats = (r_row, r_col, dots, lse_r, lse_c, comm.gather(lse_r), comm.gather(lse_c))
        else:
            sp = row_stats("siglip", image, txt_all, scale=s, bias=b, offset=off)
            loss = comm.all_reduce(sp.sum().reshape(1))[0] / n
            ctx.stats = None
        ctx.kind, ctx.backend, ctx.comm, ctx.s, ctx.b, ctx.n, ctx.fused = kind, backend, comm, s, b, n, fused
        ctx.scale_meta = (logit_scale.dtype, logit_scale.shape) if isinstance(logit_scale, torch.Tensor) else None
        ctx.bias_meta = (logit_bias.dtype, logit_bias.shape) if isinstance(logit_bias, torch.Tensor) else None
        scalars = [x for x in (logit_scale, logit_bias) if isinstance(x, torch.Tensor)]
        ctx.save_for_backward(image, text, img_all, txt_all, *scalars)
        return loss

    @staticmethod
    def backward(ctx, grad):
        image, text, img_all, txt_all, *scalars = ctx.saved_tensors
        with torch.no_grad():
            gi, gt, gs, gb = ContrastiveLossFunction._grads(ctx, image, text, img_all, txt_all, grad)
        if torch.is_grad_enabled():  # create_graph=True: first-order grads as usual, a second derivative raises
            deps = [x for x in (grad, image, text, *scalars) if x.requires_grad]
            if deps:
                gi, gt, gs, gb = (None if g is None else _NoDoubleBackward.apply(g, *deps) for g in (gi, gt, gs, gb))
        return None, None, None, gi, gt, gs, gb

    @staticmethod
    def _grads(ctx, image, text, img_all, txt_all, grad):
        _, row_grads = _primitives(ctx.backend)
        kw = dict(scale=ctx.s, bias=ctx.b, offset=ctx.comm.offset)
        coef = 1.0 / (2 * ctx.n) if ctx.kind == "clip" else 1.0 / ctx.n
        if ctx.fused:
            lse_r, lse_c = ctx.stats[3:5] if ctx.kind == "clip" else (None, None)
            di, dt, ds_rows, db_rows = torch_fused_grads(
                ctx.kind, image, text, lse_r, lse_c, scale=ctx.s, bias=ctx.b, coef=coef
            )
        elif ctx.kind == "clip":
            lse_r, lse_c, lse_r_all, lse_c_all = ctx.stats[3:]
            di, ds_rows, _ = row_grads("clip", image, txt_all, lse_r, lse_c_all, coef=coef, **kw)
            dt, _, _ = row_grads("clip", text, img_all, lse_c, lse_r_all, coef=coef, **kw)
            db_rows = ds_rows.new_zeros(1)
        else:
            di, ds_rows, db_rows = row_grads("siglip", image, txt_all, None, None, coef=coef, **kw)
            dt, _, _ = row_grads("siglip", text, img_all, None, None, coef=coef, **kw)
        if ctx.kind == "clip":  # the positives: (softmax_row_ii - 1) + (softmax_col_ii - 1), from the precise r
            r_row, r_col, dots = ctx.stats[:3]
            g_pos = (torch.expm1(-r_row) + torch.expm1(-r_col)) * coef  # (n_local,) dL/dz_ii
            di = di + (g_pos * ctx.s)[:, None] * text.float()
            dt = dt + (g_pos * ctx.s)[:, None] * image.float()
            ds_rows = ds_rows.sum() + (g_pos * dots).sum()
        grad = grad.float()
        g_feat = grad * ctx.comm.feature_grad_scale
        gi = (di * g_feat).to(image.dtype) if ctx.needs_input_grad[3] else None
        gt = (dt * g_feat).to(text.dtype) if ctx.needs_input_grad[4] else None
        gs = gb = None
        if ctx.scale_meta is not None or ctx.bias_meta is not None:
            sums = ctx.comm.all_reduce(torch.stack([ds_rows.sum(), db_rows.sum()]))
            g_scalar = grad * ctx.comm.scalar_grad_scale
            if ctx.needs_input_grad[5]:
                gs = (sums[0] * g_scalar).to(ctx.scale_meta[0]).expand(ctx.scale_meta[1]).clone()
            if ctx.needs_input_grad[6]:
                gb = (sums[1] * g_scalar).to(ctx.bias_meta[0]).expand(ctx.bias_meta[1]).clone()
        return gi, gt, gs, gb


# ---------------------------------------------------------------------------------------------------- checks


def _check_scalar(name: str, x, device) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, float, torch.Tensor)):
        raise InputError(f"{name} must be a float or a 0-dim/1-element float tensor, got {type(x).__name__}")
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or not x.dtype.is_floating_point:
            raise InputError(f"{name} must be a 1-element float tensor, got shape {tuple(x.shape)} dtype {x.dtype}")
        if x.device != device:
            raise InputError(f"{name} is on {x.device} but the features are on {device}")


def check_loss_inputs(
    image_features, text_features, logit_scale, logit_bias=None, *, has_bias=False, allow_empty=False
) -> None:
    """Shared by fastenc.ops and fastenc.distributed: (N, d) features of one dtype, N equal, scalar scale/bias.
    allow_empty: N = 0 passes (fastenc.distributed checks the shard sizes of all ranks together)."""
    check_tensor("image_features", image_features, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("text_features", text_features, ndim=2, dtypes=FLOAT_DTYPES, device=image_features.device)
    if text_features.dtype != image_features.dtype:
        raise InputError(f"text_features has dtype {text_features.dtype} but image_features has {image_features.dtype}")
    if text_features.shape != image_features.shape:
        raise InputError(
            f"text_features must have image_features' shape (N, d)={tuple(image_features.shape)} (one positive "
            f"pair per row), got {tuple(text_features.shape)}"
        )
    if image_features.shape[0] == 0 and not allow_empty:
        raise InputError("image_features must have at least one row, got shape (0, d)")
    _check_scalar("logit_scale", logit_scale, image_features.device)
    if has_bias:
        _check_scalar("logit_bias", logit_bias, image_features.device)


def _contrastive_kernels():
    """fastenc.kernels.contrastive, imported on first use (importing triton follows TRITON_INTERPRET)."""
    from ..kernels import contrastive

    return contrastive


def _loss_backend(op, x, backend, strict):
    return choose_backend(
        op, x.device, backend, strict, lambda: _contrastive_kernels().contrastive_unsupported_reason(x)
    )


def _as_arg(x):
    """Python numbers go in as-is (no grad); tensors keep their graph."""
    return x if isinstance(x, torch.Tensor) else float(x)


# ---------------------------------------------------------------------------------------------------- public ops


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    backend: str | None = None,
    strict: bool = False,
) -> torch.Tensor:
    """Symmetric InfoNCE: (CE(s I T^T, arange) + CE(s T I^T, arange)) / 2. Features (N, d), used as given.

    logit_scale: the multiplier s (already exp'd), a float or 1-element tensor (differentiable). Returns a 0-dim fp32
    tensor; fp32/fp16/bf16 features, math in fp32. Never builds the N x N logits.
    """
    check_loss_inputs(image_features, text_features, logit_scale)
    which = _loss_backend("clip_loss", image_features, backend, strict)
    return ContrastiveLossFunction.apply(
        "clip", which, LocalComm(), image_features, text_features, _as_arg(logit_scale), None
    )


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    backend: str | None = None,
    strict: bool = False,
) -> torch.Tensor:
    """Sigmoid loss: -sum(logsigmoid(labels * (s I T^T + b))) / N, labels = 2 eye - 1. Features (N, d), as given.

    logit_scale, logit_bias: floats or 1-element tensors (differentiable). Returns a 0-dim fp32 tensor; math in fp32.
    Never builds the N x N logits.
    """
    check_loss_inputs(image_features, text_features, logit_scale, logit_bias, has_bias=True)
    which = _loss_backend("siglip_loss", image_features, backend, strict)
    return ContrastiveLossFunction.apply(
        "siglip", which, LocalComm(), image_features, text_features, _as_arg(logit_scale), _as_arg(logit_bias)
    )


# ---------------------------------------------------------------------------------------------------- custom ops
# The loss's own forward / backward pieces: no autograd formula of their own (ContrastiveLossFunction is the loss's).


def _row_stats_launch(
    kind: str, a: torch.Tensor, b: torch.Tensor, scale: float, bias: float, offset: int
) -> torch.Tensor:
    return _contrastive_kernels().contrastive_row_stats(kind, a, b, scale=scale, bias=bias, offset=offset)


def _row_grads_launch(
    kind: str,
    a: torch.Tensor,
    b: torch.Tensor,
    stat_a: torch.Tensor | None,
    stat_b: torch.Tensor | None,
    scale: float,
    bias: float,
    offset: int,
    coef: float,
) -> list[torch.Tensor]:
    grads = _contrastive_kernels().contrastive_row_grads(
        kind, a, b, stat_a, stat_b, scale=scale, bias=bias, offset=offset, coef=coef
    )
    return list(grads)


def _row_stats_fake(kind, a, b, scale, bias, offset):
    return torch.empty(a.shape[0], dtype=torch.float32, device=a.device)


def _row_grads_fake(kind, a, b, stat_a, stat_b, scale, bias, offset, coef):
    n = a.shape[0]
    return [
        torch.empty(n, a.shape[1], dtype=torch.float32, device=a.device),
        torch.empty(n, dtype=torch.float32, device=a.device),
        torch.empty(n, dtype=torch.float32, device=a.device),
    ]


add_ops(
    OpSpec("contrastive_row_stats", _row_stats_launch, _row_stats_fake),
    OpSpec("contrastive_row_grads", _row_grads_launch, _row_grads_fake),
)

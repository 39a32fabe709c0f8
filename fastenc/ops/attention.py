"""fastenc.ops.attention: softmax(scale * q @ k^T + bias, masked) @ v over (B, H, S, D) tensors.

Relative-position bias (T5, UMT5) is passed as two small tensors instead of an (Sq, Sk) bias:
    rel_bias_table: (num_buckets, H) float, the learned table (relative_attention_bias.weight)
    rel_bias_lut:   (Sq + Sk - 1,) int32/int64, bucket id of each relative distance d = j - i, at index d + Sq - 1
and the score of (h, i, j) gains rel_bias_table[rel_bias_lut[j - i + Sq - 1], h]. `relative_position_buckets`
builds the lut with transformers' exact formula (fp32 log on the host), so buckets match bit for bit.

Gradients (Triton backend): when autograd will need them, the op runs `torch.ops.fastenc.attention_fwd_stats`, the
forward kernel that also writes two fp32 statistics per query row (the base-2 row max m and 1 / l); its backward is
the fused Triton backward (kernels/attention.py, "Backward"): dQ, dK, dV, the additive bias's gradient when the bias
requires grad, and the T5 table's gradient accumulated per distance in-kernel, with O(S) extra memory (no (Sq, Sk)
tensor except a dense bias's own gradient). Otherwise it runs `torch.ops.fastenc.attention`, whose own backward
(for direct op users and torch.export graphs) recomputes the statistics first. The torch backend differentiates
SDPA / the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import cuda as _cuda
from ..core.dispatch import choose_backend
from ..core.errors import InputError
from ..core.trace import record
from ._common import FLOAT_DTYPES, check_same_dtype, check_tensor
from ._library import OpSpec, _vjp_grads, add_ops, fastenc_op, load_cuda_ops, raise_double_backward
from .reference import attention_reference, relative_bias_reference


@functools.cache
def _attention_kernels():
    """fastenc.kernels.attention, imported on first use (importing triton follows TRITON_INTERPRET)."""
    from ..kernels import attention

    return attention


def attention_triton_reason(q, k, v, bias, rel_bias_table=None):
    """Why the Triton kernel cannot take these inputs (None if it can)."""
    return _attention_kernels().attention_unsupported_reason(q, k, v, bias, rel_bias_table)


# ---------------------------------------------------------------------------------------------------- public op


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    rel_bias_table: torch.Tensor | None = None,
    rel_bias_lut: torch.Tensor | None = None,
    backend: str | None = None,
    strict: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention. q: (B, H, Sq, D), k, v: (B, H, Sk, D) -> (B, H, Sq, D).

    key_padding_mask: (B, Sk), bool or 0/1 integers, True/1 = attend. bias: additive, broadcastable to
    (B, H, Sq, Sk). scale defaults to D ** -0.5. The Triton output is a (B, Sq, H, D)-contiguous buffer seen as
    (B, H, Sq, D), so `.transpose(1, 2).reshape(B, Sq, H * D)` is free.

    rel_bias_table: (num_buckets, H) float and rel_bias_lut: (Sq + Sk - 1,) int32/int64 bucket ids, both or
    neither: adds rel_bias_table[rel_bias_lut[j - i + Sq - 1], h] to score (h, i, j) (T5 relative-position bias;
    build the lut with `relative_position_buckets`). The Triton kernel gathers it per tile, never forming the
    (Sq, Sk) bias. Lut values must lie in [0, num_buckets): checked for CPU tensors; on CUDA they are not checked
    (that would synchronise), nor under torch.compile, and the kernel clamps them into range instead.
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, device=q.device)
    check_tensor("v", v, ndim=4, device=q.device)
    check_same_dtype("q", q, k=k, v=v)
    b, h, sq, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[3] != d or v.shape != k.shape:
        raise InputError(
            f"k and v must have shape (B={b}, H={h}, Sk, D={d}) matching q {tuple(q.shape)}, "
            f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    sk = k.shape[2]
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=None, device=q.device)
        if tuple(key_padding_mask.shape) != (b, sk):
            raise InputError(f"key_padding_mask must have shape (B={b}, Sk={sk}), got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.dtype.is_floating_point or key_padding_mask.dtype.is_complex:
            raise InputError(f"key_padding_mask must be bool or integer 0/1, got {key_padding_mask.dtype}")
        key_padding_mask = key_padding_mask.to(torch.bool)
    if bias is not None:
        check_tensor("bias", bias, ndim=4, dtypes=FLOAT_DTYPES, device=q.device)
        try:
            torch.broadcast_shapes(bias.shape, (b, h, sq, sk))
        except RuntimeError:
            want = (b, h, sq, sk)
            raise InputError(f"bias must broadcast to (B, H, Sq, Sk)={want}, got {tuple(bias.shape)}") from None
    if (rel_bias_table is None) != (rel_bias_lut is None):
        raise InputError("rel_bias_table and rel_bias_lut must be given together (or neither)")
    if rel_bias_table is not None:
        check_tensor("rel_bias_table", rel_bias_table, ndim=2, dtypes=FLOAT_DTYPES, device=q.device)
        if rel_bias_table.shape[1] != h or rel_bias_table.shape[0] == 0:
            raise InputError(
                f"rel_bias_table must have shape (num_buckets >= 1, H={h}), got {tuple(rel_bias_table.shape)}"
            )
        check_tensor("rel_bias_lut", rel_bias_lut, ndim=1, dtypes=(torch.int32, torch.int64), device=q.device)
        if rel_bias_lut.shape[0] != sq + sk - 1:
            raise InputError(
                f"rel_bias_lut must have shape (Sq + Sk - 1 = {sq + sk - 1},) for Sq={sq}, Sk={sk}, "
                f"got {tuple(rel_bias_lut.shape)}"
            )
        # a data-dependent check: eager CPU calls only (torch.compile cannot branch on values; the kernel clamps)
        if rel_bias_lut.device.type == "cpu" and rel_bias_lut.numel() > 0 and not torch.compiler.is_compiling():
            lo, hi = int(rel_bias_lut.min()), int(rel_bias_lut.max())
            if lo < 0 or hi >= rel_bias_table.shape[0]:
                raise InputError(
                    f"rel_bias_lut values must lie in [0, num_buckets={rel_bias_table.shape[0]}), got [{lo}, {hi}]"
                )
    if scale is None:
        scale = d**-0.5
    scale = float(scale)
    if causal and sq != sk:
        raise InputError(f"causal attention needs Sq == Sk, got Sq={sq}, Sk={sk}")

    reason = lambda: attention_triton_reason(q, k, v, bias, rel_bias_table)
    cuda_reason = lambda: _cuda.cuda_attention_unsupported_reason(q, k, v, bias, rel_bias_table)
    which = choose_backend("attention", q.device, backend, strict, reason, cuda_reason)
    return run_attention(which, q, k, v, key_padding_mask, bias, rel_bias_table, rel_bias_lut, bool(causal), scale)


def run_attention(which, q, k, v, key_padding_mask, bias, rel_bias_table, rel_bias_lut, causal, scale):
    """The checked inputs on backend `which` (the public op's and the op plan's last step)."""
    if which == "torch":
        return attention_torch_op(q, k, v, key_padding_mask, bias, rel_bias_table, rel_bias_lut, causal, scale)
    if which == "cuda":  # short sequences, fp16/bf16, no bias: everything else took Triton
        load_cuda_ops()
        return _cuda.cuda_attention_forward(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    args = (q, k, v, key_padding_mask, bias, rel_bias_table, rel_bias_lut, causal, scale)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias, rel_bias_table))
    if grad and not torch.compiler.is_exporting():  # torch.export: an inference graph, the plain op (still trainable)
        out, _stats = fastenc_op("attention_fwd_stats")(*args)  # saves the O(S) row statistics for the backward
        return out
    return fastenc_op("attention")(*args)


# ---------------------------------------------------------------------------------------------------- torch backend


class SdpaMask:
    """The masks of one attention call pattern, converted once per forward.

    mask / is_causal: the arguments of F.scaled_dot_product_attention (mask None, boolean (B, 1, Sq, Sk) with True =
    attend, or additive, broadcastable to (B, H, Sq, Sk)). reference: (key_padding_mask, bias, causal) when a
    key-padding mask is present. SDPA adds its mask to the scores, so an inf / NaN at a masked key would still
    reach the row, and it cannot tell a row whose scores are all -inf from one whose keys are all masked; with
    padding, SDPA therefore runs only on a CPU after one check that q, k and v are finite (then both rules agree),
    and the explicit reference (masking by replacement) otherwise."""

    __slots__ = ("is_causal", "mask", "reference")

    def __init__(self, mask, is_causal: bool, reference=None):
        self.mask, self.is_causal, self.reference = mask, is_causal, reference


def sdpa_mask(
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    sq: int,
    sk: int,
    device: torch.device,
    *,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> SdpaMask:
    """The attention masks of one forward: causal (top-left aligned), key padding (B, Sk) bool True = attend (an
    all-True mask on the CPU is dropped: the value check costs a host sync on a GPU), and an additive bias
    broadcastable to (B, H, Sq, Sk), converted to `dtype` once."""
    on_cpu = device.type == "cpu" and not torch.compiler.is_compiling()
    if key_padding_mask is not None and on_cpu and bool(key_padding_mask.all()):
        key_padding_mask = None  # no padding: SDPA's causal / unmasked kernels apply
    if bias is not None:
        bias = bias.to(dtype)

    def causal_keep():  # (1, 1, Sq, Sk), True = attend
        return torch.ones(sq, sk, dtype=torch.bool, device=device).tril()[None, None]

    if key_padding_mask is not None:
        mask = None
        if on_cpu:  # the finite fast path's mask
            keep = key_padding_mask[:, None, None, :]  # (B, 1, 1, Sk)
            if causal:
                keep = keep & causal_keep()
            mask = keep.expand(-1, -1, sq, sk) if bias is None else bias.masked_fill(~keep, float("-inf"))
        return SdpaMask(mask, False, (key_padding_mask, bias, causal))
    if bias is None:
        return SdpaMask(None, causal)
    if causal:
        bias = bias.masked_fill(~causal_keep(), float("-inf"))
    return SdpaMask(bias, False)


def attention_torch(q, k, v, m: SdpaMask, scale: float) -> torch.Tensor:
    """softmax(scale q k^T + mask) v. q: (B, H, Sq, D), k, v: (B, H, Sk, D) -> (B, H, Sq, D)."""
    if m.reference is not None and (m.mask is None or not bool((q.sum() + k.sum() + v.sum()).isfinite())):
        key_padding_mask, bias, causal = m.reference
        return attention_reference(q, k, v, key_padding_mask, bias, causal=causal, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m.mask, is_causal=m.is_causal, scale=scale)


def attention_torch_op(q, k, v, key_padding_mask, bias, rel_bias_table, rel_bias_lut, causal, scale):
    """The public op's torch backend (inputs already checked, key_padding_mask bool)."""
    sq, sk = q.shape[2], k.shape[2]
    if rel_bias_table is not None:
        rel = relative_bias_reference(rel_bias_table, rel_bias_lut, sq, sk).to(q.dtype)  # (1, H, Sq, Sk)
        bias = rel if bias is None else bias + rel
    m = sdpa_mask(key_padding_mask, causal, sq, sk, q.device, bias=bias, dtype=q.dtype)
    return attention_torch(q, k, v, m, scale)


# ---------------------------------------------------------------------------------------------------- custom ops


def _attention_launch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    bias: Tensor | None,
    rel_bias_table: Tensor | None,
    rel_bias_lut: Tensor | None,
    causal: bool,
    scale: float,
) -> Tensor:
    return _attention_kernels().attention_forward(
        q,
        k,
        v,
        causal=causal,
        key_padding_mask=key_padding_mask,
        bias=bias,
        scale=scale,
        rel_bias_table=rel_bias_table,
        rel_bias_lut=rel_bias_lut,
    )


def _attention_fwd_stats_launch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    bias: Tensor | None,
    rel_bias_table: Tensor | None,
    rel_bias_lut: Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    out, stats = _attention_kernels().attention_forward(
        q, k, v, causal=causal, key_padding_mask=key_padding_mask, bias=bias, scale=scale,
        rel_bias_table=rel_bias_table, rel_bias_lut=rel_bias_lut, return_stats=True,
    )  # fmt: skip
    return out, stats


def _attention_backward_launch(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    stats: Tensor,
    key_padding_mask: Tensor | None,
    bias: Tensor | None,
    rel_bias_table: Tensor | None,
    rel_bias_lut: Tensor | None,
    causal: bool,
    scale: float,
    bias_grad: bool,
    table_grad: bool,
) -> list[Tensor]:
    dq, dk, dv, dbias, dtable = _attention_kernels().attention_backward(
        dout, q, k, v, out, stats, causal=causal, key_padding_mask=key_padding_mask, bias=bias, scale=scale,
        rel_bias_table=rel_bias_table, rel_bias_lut=rel_bias_lut, bias_grad=bias_grad, table_grad=table_grad,
    )  # fmt: skip
    return [dq, dk, dv] + [g for g in (dbias, dtable) if g is not None]


def _attention_fake(q, k, v, key_padding_mask, bias, rel_bias_table, rel_bias_lut, causal, scale):
    b, h, sq, d = q.shape
    return torch.empty(b, sq, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, H, Sq, D) view


def _attention_fwd_stats_fake(q, k, v, key_padding_mask, bias, rel_bias_table, rel_bias_lut, causal, scale):
    b, h, sq, d = q.shape
    out = torch.empty(b, sq, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, H, Sq, D) view
    return out, torch.empty(b, h, 2, sq, dtype=torch.float32, device=q.device)


def _attention_backward_fake(
    dout, q, k, v, out, stats, key_padding_mask, bias, rel_bias_table, rel_bias_lut, causal, scale, bias_grad,
    table_grad,
):  # fmt: skip
    b, h, sq, d = q.shape
    sk = k.shape[2]
    grads = [
        torch.empty(b, h, sq, d, dtype=q.dtype, device=q.device),
        torch.empty(b, h, sk, d, dtype=k.dtype, device=q.device),
        torch.empty(b, h, sk, d, dtype=v.dtype, device=q.device),
    ]
    if bias_grad and bias is not None:
        grads.append(torch.empty(bias.shape, dtype=bias.dtype, device=q.device))
    if table_grad and rel_bias_table is not None:
        grads.append(torch.empty(rel_bias_table.shape, dtype=rel_bias_table.dtype, device=q.device))
    return grads


_ATTN_INPUTS = ("q", "k", "v", "key_padding_mask", "bias", "rel_bias_table", "rel_bias_lut", "causal", "scale")


def _attention_grads(args, needs, dout, out=None, stats=None) -> tuple:
    """The nine input gradients of attention(*args) for output gradient `dout`, by the fused Triton backward:
    `out` / `stats` from `attention_fwd_stats` (recomputed here when None: one forward, O(S) memory)."""
    q, k, v, key_padding_mask, bias, table, lut, causal, scale = args
    if dout is None or not any(needs):
        return (None,) * len(_ATTN_INPUTS)
    if out is None:
        out, stats = fastenc_op("attention_fwd_stats")(*args)
    bias_grad = bias is not None and needs[4]
    table_grad = table is not None and needs[5]
    grads = fastenc_op("attention_backward")(
        dout, q, k, v, out, stats, key_padding_mask, bias, table, lut, causal, scale, bias_grad, table_grad
    )
    record("triton", "attention_backward")  # this thread's trace(); CUDA runs backward on its own device thread
    dq, dk, dv, *rest = grads
    dbias = rest.pop(0) if bias_grad else None
    dtable = rest.pop(0) if table_grad else None
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, None, dbias, dtable,
            None, None, None)  # fmt: skip


def register_saved_autograd(op) -> None:
    """attention_fwd_stats: save (inputs, out, stats); stats is not differentiable."""

    def setup_context(ctx, inputs, output):
        q, k, v, mask, bias, table, lut, causal, scale = inputs
        out, stats = output
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no zeros for the stats' (absent) gradient
        ctx.save_for_backward(q, k, v, mask, bias, table, lut, out, stats)
        ctx.causal, ctx.scale = causal, scale

    def backward(ctx, dout, _dstats):
        q, k, v, mask, bias, table, lut, out, stats = ctx.saved_tensors
        args = (q, k, v, mask, bias, table, lut, ctx.causal, ctx.scale)
        return _attention_grads(args, ctx.needs_input_grad, dout, out, stats)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def register_recompute_autograd(op, fallback: Callable[..., Tensor] | None = None) -> None:
    """fastenc::attention / fastenc_cuda::attention: save the inputs only, recompute (out, stats) in backward.
    `fallback` (a reference with the op's signature) runs through torch.func.vjp where Triton cannot."""

    def setup_context(ctx, inputs, output):
        q, k, v, mask, bias, table, lut, causal, scale = inputs
        ctx.save_for_backward(q, k, v, mask, bias, table, lut)
        ctx.causal, ctx.scale = causal, scale

    def backward(ctx, dout):
        q, k, v, mask, bias, table, lut = ctx.saved_tensors
        args = (q, k, v, mask, bias, table, lut, ctx.causal, ctx.scale)
        needs = ctx.needs_input_grad
        if fallback is not None and attention_triton_reason(q, k, v, bias, table) is not None:
            diff = [i for i in (0, 1, 2, 4, 5) if args[i] is not None and needs[i]]
            return tuple(_vjp_grads(fallback, args, diff, [dout]))
        return _attention_grads(args, needs, dout)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def _register_no_double_backward(op) -> None:
    """attention_backward: gradients taken with create_graph=True are right; differentiating them raises."""

    def backward(ctx, *grads):
        raise_double_backward("fastenc attention")

    torch.library.register_autograd(op, backward, setup_context=lambda ctx, inputs, output: None)


def attention_reference_op(q, k, v, key_padding_mask, bias, rel_bias_table, rel_bias_lut, causal, scale):
    """attention_reference with the op's positional signature."""
    return attention_reference(
        q, k, v, key_padding_mask, bias, rel_bias_table, rel_bias_lut, causal=causal, scale=scale
    )


add_ops(
    OpSpec(
        "attention", _attention_launch, _attention_fake, register_recompute_autograd, attention_reference_op,
        cuda_autograd=functools.partial(register_recompute_autograd, fallback=attention_reference_op),
    ),
    OpSpec("attention_fwd_stats", _attention_fwd_stats_launch, _attention_fwd_stats_fake, register_saved_autograd),
    OpSpec("attention_backward", _attention_backward_launch, _attention_backward_fake, _register_no_double_backward),
)  # fmt: skip

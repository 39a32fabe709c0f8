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

import torch

from ..core import cuda as _cuda
from ..core.dispatch import choose_backend
from ..core.errors import InputError
from . import _torch
from ._common import FLOAT_DTYPES, check_same_dtype, check_tensor
from ._library import fastenc_op
from .reference import (  # noqa: F401 - the references live in .reference; these names stay importable here
    attention_reference,
    relative_bias_reference,
    relative_position_buckets,
)


def _triton_reason(*args):
    """Why the Triton kernel cannot take these inputs (None if it can): fastenc.kernels.attention, imported on first
    use (importing triton follows TRITON_INTERPRET)."""
    from ..kernels import attention as kernels

    return kernels.attention_unsupported_reason(*args)


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

    reason = lambda: _triton_reason(q, k, v, bias, rel_bias_table)
    cuda_reason = lambda: _cuda.attention_unsupported_reason(q, k, v, bias, rel_bias_table)
    which = choose_backend("attention", q.device, backend, strict, reason, cuda_reason)
    if which == "torch":
        return _torch.attention_op(
            q, k, v, key_padding_mask, bias, rel_bias_table, rel_bias_lut, causal=causal, scale=scale
        )
    if which == "cuda":  # short sequences, fp16/bf16, no bias: everything else took Triton above
        kpm = key_padding_mask
        return _cuda.attention_forward(q, k, v, causal=causal, key_padding_mask=kpm, bias=None, scale=scale)
    args = (q, k, v, key_padding_mask, bias, rel_bias_table, rel_bias_lut, bool(causal), scale)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias, rel_bias_table))
    if grad and not torch.compiler.is_exporting():  # torch.export: an inference graph, the plain op (still trainable)
        out, _stats = fastenc_op("attention_fwd_stats")(*args)  # saves the O(S) row statistics for the backward
        return out
    return fastenc_op("attention")(*args)

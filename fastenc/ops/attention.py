"""fastenc.ops.attention: softmax(scale * q @ k^T + bias, masked) @ v over (B, H, S, D) tensors."""

from __future__ import annotations

import functools

import torch

from .._dispatch import record, resolve_backend
from ..errors import InputError
from ._common import FLOAT_DTYPES, check_same_dtype, check_tensor, run_kernel


def attention_reference(q, k, v, key_padding_mask=None, bias=None, *, causal=False, scale=None):
    """Plain-torch attention, fp32 math. Rows whose keys are all masked give 0 (never NaN).

    q: (B, H, Sq, D), k/v: (B, H, Sk, D), key_padding_mask: (B, Sk) bool, True = attend,
    bias: broadcastable to (B, H, Sq, Sk). causal masks key j > query i (top-left aligned, as torch SDPA).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    if bias is not None:
        s = s + bias.float()
    keep = None
    if causal:
        sq, sk = s.shape[-2:]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :].to(torch.bool)
        keep = pad if keep is None else keep & pad
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if keep is not None:
        p = p.nan_to_num(0.0)  # fully masked rows: softmax of all -inf is NaN; define them as 0
    return torch.matmul(p, v.float()).to(q.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
    strict: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention. q: (B, H, Sq, D), k, v: (B, H, Sk, D) -> (B, H, Sq, D).

    key_padding_mask: (B, Sk), bool or 0/1 integers, True/1 = attend. bias: additive, broadcastable to
    (B, H, Sq, Sk). scale defaults to D ** -0.5. The Triton output is a (B, Sq, H, D)-contiguous buffer seen as
    (B, H, Sq, D), so `.transpose(1, 2).reshape(B, Sq, H * D)` is free.
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
    if scale is None:
        scale = d**-0.5
    scale = float(scale)
    if causal and sq != sk:
        raise InputError(f"causal attention needs Sq == Sk, got Sq={sq}, Sk={sk}")

    reasons = {}
    if q.device.type in ("cuda", "cpu"):
        from .._dispatch import _triton_can_run

        if _triton_can_run(q.device) is None:
            from ..kernels import attention as kernels

            reasons["triton"] = kernels.attention_unsupported_reason(q, k, v, bias)
    which = resolve_backend("attention", backend, q.device, strict=strict, unsupported=reasons)
    record(which, "attention")
    ref = functools.partial(attention_reference, causal=causal, scale=scale)
    if which == "torch":
        return ref(q, k, v, key_padding_mask, bias)
    from ..kernels import attention as kernels

    def kernel(q, k, v, kpm, bias):
        return kernels.attention_forward(q, k, v, causal=causal, key_padding_mask=kpm, bias=bias, scale=scale)

    return run_kernel(kernel, ref, q, k, v, key_padding_mask, bias)

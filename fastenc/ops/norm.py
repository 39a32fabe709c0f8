"""fastenc.ops.layer_norm and fastenc.ops.rms_norm, each with an optional fused residual add.

With `residual`, both return (normed, summed) where summed = x + residual (rounded to x.dtype, as the eager
`residual + hidden_states` is) and normed = norm(summed); the caller carries `summed` as the next residual.

Gradients: on the Triton and CUDA backends the op's registered backward is the fused Triton kernel
(fastenc::layer_norm_backward / rms_norm_backward, kernels/norm.py): statistics recomputed from the saved summed
input, dx and dresidual in one pass (the gradient of `summed` added in), dweight / dbias as per-program fp32 partial
sums. Rows wider than kernels.norm.MAX_FUSED_BWD_N differentiate the reference instead (a recorded fall-back). The
torch backend is plain aten autograd.
"""

from __future__ import annotations

from ..core import cuda as _cuda
from ..core.dispatch import choose_backend
from ..core.errors import InputError
from . import _torch
from ._common import FLOAT_DTYPES, check_tensor
from ._library import fastenc_op
from .reference import (  # noqa: F401 - the references live in .reference; these names stay importable here
    layer_norm_reference,
    rms_norm_reference,
)


def _check_norm_inputs(x, weight, bias, residual, eps):
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise InputError(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    check_tensor("weight", weight, ndim=1, device=x.device)
    if weight.shape[0] != n:
        raise InputError(f"weight must have shape ({n},) to match x's last dim, got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=x.device)
        if bias.shape[0] != n:
            raise InputError(f"bias must have shape ({n},) to match x's last dim, got {tuple(bias.shape)}")
    if residual is not None:
        check_tensor("residual", residual, device=x.device)
        if residual.shape != x.shape:
            raise InputError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise InputError(f"residual has dtype {residual.dtype} but x has {x.dtype}; they must match")
    if not isinstance(eps, (float, int)) or eps < 0:
        raise InputError(f"eps must be a non-negative float, got {eps!r}")


def _triton_reason(*args):
    """Why the Triton kernel cannot take these inputs (None if it can): fastenc.kernels.norm, imported on first
    use (importing triton follows TRITON_INTERPRET)."""
    from ..kernels import norm as kernels

    return kernels.norm_unsupported_reason(*args)


def _backend(op, x, backend, strict):
    return choose_backend(
        op,
        x.device,
        backend,
        strict,
        lambda: _triton_reason(x),
        lambda: _cuda.norm_unsupported_reason(x),
    )


def layer_norm(x, weight, bias, eps, residual=None, *, backend=None, strict=False):
    """LayerNorm over the last dim. x: (..., N); weight, bias: (N,). residual: like x -> (normed, x + residual)."""
    _check_norm_inputs(x, weight, bias, residual, eps)
    which = _backend("layer_norm", x, backend, strict)
    if which == "torch":
        return _torch.layer_norm(x, weight, bias, float(eps), residual)
    if which == "cuda":
        y, s = _cuda.layer_norm_forward(x, weight, bias, float(eps), residual)
        return y if residual is None else (y, s)
    out = fastenc_op("layer_norm")(x, weight, bias, residual, float(eps))
    return out[0] if residual is None else (out[0], out[1])


def rms_norm(x, weight, eps, residual=None, *, backend=None, strict=False):
    """T5-style RMSNorm over the last dim. x: (..., N); weight: (N,). residual: like x -> (normed, x + residual)."""
    _check_norm_inputs(x, weight, None, residual, eps)
    which = _backend("rms_norm", x, backend, strict)
    if which == "torch":
        return _torch.rms_norm(x, weight, float(eps), residual)
    if which == "cuda":
        y, s = _cuda.rms_norm_forward(x, weight, float(eps), residual)
        return y if residual is None else (y, s)
    out = fastenc_op("rms_norm")(x, weight, residual, float(eps))
    return out[0] if residual is None else (out[0], out[1])

"""fastenc.ops.bias_activation: act(x + bias) in one pass over x; fastenc.ops.gated_activation: act(gate) * up.

Gradients: on the Triton and CUDA backends the op's registered backward is the fused Triton kernel
(fastenc::bias_activation_backward: dx and the dbias partial sums in one pass; gated_activation_backward: dgate and
dup), fp32 math rounded once to the inputs' dtypes. The torch backend is plain aten autograd.
"""

from __future__ import annotations

from ..core import cuda as _cuda
from ..core.dispatch import choose_backend
from ..core.errors import InputError
from . import _torch
from ._common import FLOAT_DTYPES, check_tensor
from ._library import fastenc_op
from .reference import (  # noqa: F401 - the references live in .reference; these names stay importable here
    ACTIVATIONS,
    HF_ACTIVATIONS,
    activation_reference,
    bias_activation_reference,
    gated_activation_reference,
)


def _triton_reason(*args):
    """Why the Triton kernel cannot take these inputs (None if it can): fastenc.kernels.activation, imported on first
    use (importing triton follows TRITON_INTERPRET)."""
    from ..kernels import activation as kernels

    return kernels.bias_activation_unsupported_reason(*args)


def bias_activation(x, bias, activation, *, backend=None, strict=False):
    """act(x + bias). x: (..., N); bias: (N,) or None; activation in ACTIVATIONS. fp32 math, output in x.dtype."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if activation not in ACTIVATIONS:
        raise InputError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=x.device)
        if x.dim() == 0 or bias.shape[0] != x.shape[-1]:
            raise InputError(f"bias must have shape ({x.shape[-1] if x.dim() else '?'},), got {tuple(bias.shape)}")
    reason = lambda: _triton_reason(x)
    cuda_reason = lambda: _cuda.bias_activation_unsupported_reason(x)
    which = choose_backend("bias_activation", x.device, backend, strict, reason, cuda_reason)
    if which == "torch":
        return _torch.bias_activation(x, bias, activation)
    if which == "cuda":
        return _cuda.bias_activation_forward(x, bias, activation)
    return fastenc_op("bias_activation")(x, bias, activation)


def gated_activation(gate, up, activation, *, backend=None, strict=False):
    """act(gate) * up. gate, up: (..., N), same shape, dtype and device; activation in ACTIVATIONS. fp32 math,
    output in gate.dtype. With T5's fused wi_0/wi_1 GEMM, gate and up are the two halves (strided views) of one
    (..., 2N) output."""
    check_tensor("gate", gate, dtypes=FLOAT_DTYPES)
    check_tensor("up", up, dtypes=FLOAT_DTYPES, device=gate.device)
    if activation not in ACTIVATIONS:
        raise InputError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise InputError(
            f"gate and up must have the same shape and dtype, got {tuple(gate.shape)} {gate.dtype} and "
            f"{tuple(up.shape)} {up.dtype}"
        )
    reason = lambda: _triton_reason(gate)
    cuda_reason = lambda: _cuda.bias_activation_unsupported_reason(gate)
    which = choose_backend("gated_activation", gate.device, backend, strict, reason, cuda_reason)
    if which == "torch":
        return _torch.gated_activation(gate, up, activation)
    if which == "cuda":
        return _cuda.gated_activation_forward(gate, up, activation)
    return fastenc_op("gated_activation")(gate, up, activation)

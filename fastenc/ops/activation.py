"""fastenc.ops.bias_activation: act(x + bias) in one pass over x."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .. import _cuda
from .._dispatch import choose_backend, kernel_module
from ..errors import InputError
from ._common import FLOAT_DTYPES, check_tensor
from ._library import fastenc_op

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh", "relu")

# transformers' config.hidden_act / dense_act_fn names -> ours. gelu_new, gelu_fast and gelu_pytorch_tanh are the
# same tanh formula 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))) written three ways.
HF_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "relu": "relu",
}

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def activation_reference(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation in fp32."""
    if activation == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "relu":
        return torch.relu(x)
    raise InputError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def bias_activation_reference(x, bias=None, *, activation):
    h = x.float() if bias is None else x.float() + bias.float()
    return activation_reference(h, activation).to(x.dtype)


def bias_activation(x, bias, activation, *, backend=None, strict=False):
    """act(x + bias). x: (..., N); bias: (N,) or None; activation in ACTIVATIONS. fp32 math, output in x.dtype."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if activation not in ACTIVATIONS:
        raise InputError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=x.device)
        if x.dim() == 0 or bias.shape[0] != x.shape[-1]:
            raise InputError(f"bias must have shape ({x.shape[-1] if x.dim() else '?'},), got {tuple(bias.shape)}")
    reason = lambda: kernel_module("activation").bias_activation_unsupported_reason(x)
    cuda_reason = lambda: _cuda.bias_activation_unsupported_reason(x)
    which = choose_backend("bias_activation", x.device, backend, strict, reason, cuda_reason)
    ref = functools.partial(bias_activation_reference, activation=activation)
    if which == "torch":
        return ref(x, bias)
    if which == "cuda":
        return _cuda.bias_activation_forward(x, bias, activation)
    return fastenc_op("bias_activation")(x, bias, activation)


def gated_activation_reference(gate, up, *, activation):
    """act(gate) * up in fp32, output in gate.dtype (T5's DenseGatedActDense before `wo`)."""
    return (activation_reference(gate.float(), activation) * up.float()).to(gate.dtype)


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
    reason = lambda: kernel_module("activation").bias_activation_unsupported_reason(gate)
    cuda_reason = lambda: _cuda.bias_activation_unsupported_reason(gate)
    which = choose_backend("gated_activation", gate.device, backend, strict, reason, cuda_reason)
    ref = functools.partial(gated_activation_reference, activation=activation)
    if which == "torch":
        return ref(gate, up)
    if which == "cuda":
        return _cuda.gated_activation_forward(gate, up, activation)
    return fastenc_op("gated_activation")(gate, up, activation)

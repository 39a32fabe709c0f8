"""fastenc.ops.bias_activation: act(x + bias) in one pass over x; fastenc.ops.gated_activation: act(gate) * up.

Gradients: on the Triton and CUDA backends the op's registered backward is the fused Triton kernel
(fastenc::bias_activation_backward: dx and the dbias partial sums in one pass; gated_activation_backward: dgate and
dup), fp32 math rounded once to the inputs' dtypes. The torch backend is plain aten autograd.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import cuda as _cuda
from ..core.dispatch import choose_backend
from ..core.errors import InputError
from ..core.trace import warn_fallback
from ._common import FLOAT_DTYPES, check_tensor
from ._library import (
    OpSpec,
    _vjp_grads,
    add_ops,
    empty_like_shape,
    fastenc_op,
    fused_backward_reason,
    load_cuda_ops,
    register_no_double_backward,
)
from .reference import (
    ACTIVATION_FNS,
    ACTIVATIONS,
    activation_reference,
    bias_activation_reference,
    gated_activation_reference,
)


@functools.cache
def _activation_kernels():
    """fastenc.kernels.activation, imported on first use (importing triton follows TRITON_INTERPRET)."""
    from ..kernels import activation

    return activation


def activation_triton_reason(x):
    """Why the Triton kernel cannot take x (None if it can)."""
    return _activation_kernels().bias_activation_unsupported_reason(x)


# ---------------------------------------------------------------------------------------------------- public ops


def bias_activation(x, bias, activation, *, backend=None, strict=False):
    """act(x + bias). x: (..., N); bias: (N,) or None; activation in ACTIVATIONS. fp32 math, output in x.dtype."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if activation not in ACTIVATIONS:
        raise InputError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=x.device)
        if x.dim() == 0 or bias.shape[0] != x.shape[-1]:
            raise InputError(f"bias must have shape ({x.shape[-1] if x.dim() else '?'},), got {tuple(bias.shape)}")
    reason = lambda: activation_triton_reason(x)
    cuda_reason = lambda: _cuda.cuda_activation_unsupported_reason(x)
    which = choose_backend("bias_activation", x.device, backend, strict, reason, cuda_reason)
    if which == "torch":
        return bias_activation_torch(x, bias, activation)
    if which == "cuda":
        load_cuda_ops()
        return _cuda.cuda_bias_activation_forward(x, bias, activation)
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
    reason = lambda: activation_triton_reason(gate)
    cuda_reason = lambda: _cuda.cuda_activation_unsupported_reason(gate)
    which = choose_backend("gated_activation", gate.device, backend, strict, reason, cuda_reason)
    if which == "torch":
        return gated_activation_torch(gate, up, activation)
    if which == "cuda":
        load_cuda_ops()
        return _cuda.cuda_gated_activation_forward(gate, up, activation)
    return fastenc_op("gated_activation")(gate, up, activation)


# ---------------------------------------------------------------------------------------------------- torch backend


def linear_activation_fn(dtype: torch.dtype, activation: str, *, inplace: bool = False):
    """act(x @ w^T + b) resolved for one dtype and activation: x, weight, bias -> output.

    inplace (only where autograd records nothing): the activation overwrites the GEMM's output where it can, the same
    operations in the same order, so bit-identical to the expression (quick_gelu: one temporary instead of three)."""
    if dtype != torch.float32:
        return lambda x, w, b: bias_activation_reference(F.linear(x, w), b, activation=activation)
    act, lin = (_ACTIVATIONS_INPLACE if inplace else ACTIVATION_FNS)[activation], F.linear
    return lambda x, w, b: act(lin(x, w, b))


_QUICK_GELU_ALPHA = torch.tensor(1.702, dtype=torch.float32)  # 0-dim: the Python scalar's float product (tested),
# without wrapping a Python number into a tensor on every call (1.85 vs 3.3 us for a 77 x 128 multiply here)


def _quick_gelu_(y):  # y * sigmoid(1.702 y) for fp32 y, overwriting y's temporary
    return torch.sigmoid_(y.mul(_QUICK_GELU_ALPHA)).mul_(y)


_ACTIVATIONS_INPLACE = {**ACTIVATION_FNS, "quick_gelu": _quick_gelu_, "relu": torch.relu_}


def bias_activation_torch(x, bias, activation: str):
    if x.dtype != torch.float32:
        return bias_activation_reference(x, bias, activation=activation)
    return activation_reference(x if bias is None else x + bias, activation)


def linear_activation_torch(x, weight, bias, activation: str):
    """act(x @ weight^T + bias): the bias rides in the GEMM for fp32 (one op fewer), the reference otherwise."""
    return linear_activation_fn(x.dtype, activation)(x, weight, bias)


def gated_activation_torch(gate, up, activation: str):
    return gated_activation_reference(gate, up, activation=activation)


# ---------------------------------------------------------------------------------------------------- custom ops


def _bias_activation_launch(x: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    return _activation_kernels().bias_activation_forward(x, bias, activation)


def _gated_activation_launch(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    return _activation_kernels().gated_activation_forward(gate, up, activation)


def _bias_activation_backward_launch(dy: Tensor, x: Tensor, bias: Tensor | None, activation: str) -> list[Tensor]:
    dx, dbias = _activation_kernels().bias_activation_backward(dy, x, bias, activation)
    return [dx] if dbias is None else [dx, dbias]


def _gated_activation_backward_launch(dy: Tensor, gate: Tensor, up: Tensor, activation: str) -> list[Tensor]:
    return list(_activation_kernels().gated_activation_backward(dy, gate, up, activation))


def _bias_activation_fake(x, bias, activation):
    return empty_like_shape(x)


def _gated_activation_fake(gate, up, activation):
    return empty_like_shape(gate)


def _bias_activation_backward_fake(dy, x, bias, activation):
    return [empty_like_shape(x)] + ([] if bias is None else [empty_like_shape(bias)])


def _gated_activation_backward_fake(dy, gate, up, activation):
    return [empty_like_shape(gate), empty_like_shape(gate)]


_REFERENCES = {
    "bias_activation": lambda x, b, act: bias_activation_reference(x, b, activation=act),
    "gated_activation": lambda g, u, act: gated_activation_reference(g, u, activation=act),
}


def register_activation_autograd(op, kind: str) -> None:
    """bias_activation / gated_activation, in the fastenc and fastenc_cuda namespaces: save the inputs; backward by
    the fused fastenc::<kind>_backward kernel where Triton runs, else (warned, recorded) the reference's vjp."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.activation = inputs[2]

    def backward(ctx, dy):
        a, b = ctx.saved_tensors  # (x, bias) or (gate, up)
        needs = ctx.needs_input_grad
        if not (needs[0] or needs[1]):
            return None, None, None
        why = fused_backward_reason(a)
        if why is None:
            out = fastenc_op(f"{kind}_backward")(dy, a, b, ctx.activation)
            ga, gb = out[0], (out[1] if len(out) > 1 else None)
        else:
            warn_fallback(f"{kind}_backward", "triton", "torch", why)
            args = (a, b, ctx.activation)
            g = _vjp_grads(_REFERENCES[kind], args, [i for i in (0, 1) if args[i] is not None], [dy])
            ga, gb = g[0], g[1]
        return ga if needs[0] else None, gb if needs[1] else None, None

    torch.library.register_autograd(op, backward, setup_context=setup_context)


_bias_activation_autograd = functools.partial(register_activation_autograd, kind="bias_activation")
_gated_activation_autograd = functools.partial(register_activation_autograd, kind="gated_activation")

add_ops(
    OpSpec("bias_activation", _bias_activation_launch, _bias_activation_fake, _bias_activation_autograd,
           _REFERENCES["bias_activation"], cuda_autograd=_bias_activation_autograd),
    OpSpec("gated_activation", _gated_activation_launch, _gated_activation_fake, _gated_activation_autograd,
           _REFERENCES["gated_activation"], cuda_autograd=_gated_activation_autograd),
    OpSpec("bias_activation_backward", _bias_activation_backward_launch, _bias_activation_backward_fake,
           register_no_double_backward),
    OpSpec("gated_activation_backward", _gated_activation_backward_launch, _gated_activation_backward_fake,
           register_no_double_backward),
)  # fmt: skip

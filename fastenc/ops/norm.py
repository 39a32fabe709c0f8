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
from .reference import layer_norm_reference, rms_norm_reference


@functools.cache
def _norm_kernels():
    """fastenc.kernels.norm, imported on first use (importing triton follows TRITON_INTERPRET)."""
    from ..kernels import norm

    return norm


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


def norm_triton_reason(x):
    """Why the Triton kernel cannot take x (None if it can)."""
    return _norm_kernels().norm_unsupported_reason(x)


def _norm_backend(op, x, backend, strict):
    return choose_backend(
        op, x.device, backend, strict, lambda: norm_triton_reason(x), lambda: _cuda.cuda_norm_unsupported_reason(x)
    )


# ---------------------------------------------------------------------------------------------------- public ops


def layer_norm(x, weight, bias, eps, residual=None, *, backend=None, strict=False):
    """LayerNorm over the last dim. x: (..., N); weight, bias: (N,). residual: like x -> (normed, x + residual)."""
    _check_norm_inputs(x, weight, bias, residual, eps)
    which = _norm_backend("layer_norm", x, backend, strict)
    if which == "torch":
        return layer_norm_torch(x, weight, bias, float(eps), residual)
    if which == "cuda":
        load_cuda_ops()
        y, s = _cuda.cuda_layer_norm_forward(x, weight, bias, float(eps), residual)
        return y if residual is None else (y, s)
    out = fastenc_op("layer_norm")(x, weight, bias, residual, float(eps))
    return out[0] if residual is None else (out[0], out[1])


def rms_norm(x, weight, eps, residual=None, *, backend=None, strict=False):
    """T5-style RMSNorm over the last dim. x: (..., N); weight: (N,). residual: like x -> (normed, x + residual)."""
    _check_norm_inputs(x, weight, None, residual, eps)
    which = _norm_backend("rms_norm", x, backend, strict)
    if which == "torch":
        return rms_norm_torch(x, weight, float(eps), residual)
    if which == "cuda":
        load_cuda_ops()
        y, s = _cuda.cuda_rms_norm_forward(x, weight, float(eps), residual)
        return y if residual is None else (y, s)
    out = fastenc_op("rms_norm")(x, weight, residual, float(eps))
    return out[0] if residual is None else (out[0], out[1])


# ---------------------------------------------------------------------------------------------------- torch backend


def layer_norm_torch(x, weight, bias, eps: float, residual=None):
    """LayerNorm over the last dim; with residual -> (normed, x + residual). fp32 inputs: `layer_norm_fp32_torch`."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return layer_norm_reference(x, weight, bias, residual, eps=eps)
    return layer_norm_fp32_torch(x, weight, bias, eps, residual)


def layer_norm_fp32_torch(x, weight, bias, eps: float, residual=None):
    """torch.layer_norm for fp32 x and weights, with nothing to check: what a fused fp32 model's loop calls."""
    if residual is None:
        return torch.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    s = x + residual
    return torch.layer_norm(s, (s.shape[-1],), weight, bias, eps), s


def rms_norm_torch(x, weight, eps: float, residual=None):
    """T5LayerNorm; with residual -> (normed, x + residual)."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return rms_norm_reference(x, weight, residual, eps=eps)
    s = x if residual is None else x + residual
    y = F.rms_norm(s, (s.shape[-1],), weight, eps)
    return y if residual is None else (y, s)


# ---------------------------------------------------------------------------------------------------- custom ops


def _layer_norm_launch(
    x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, eps: float
) -> list[Tensor]:
    y, s = _norm_kernels().layer_norm_forward(x, weight, bias, eps, residual)
    return [y] if s is None else [y, s]


def _rms_norm_launch(x: Tensor, weight: Tensor, residual: Tensor | None, eps: float) -> list[Tensor]:
    y, s = _norm_kernels().rms_norm_forward(x, weight, eps, residual)
    return [y] if s is None else [y, s]


def _layer_norm_backward_launch(
    dy: Tensor, ds: Tensor | None, s: Tensor, weight: Tensor, bias: Tensor | None, eps: float, dresidual: bool
) -> list[Tensor]:
    dx, dres, dweight, dbias = _norm_kernels().layer_norm_backward(dy, ds, s, weight, bias, eps, dresidual)
    return [g for g in (dx, dweight, dbias, dres) if g is not None]


def _rms_norm_backward_launch(
    dy: Tensor, ds: Tensor | None, s: Tensor, weight: Tensor, eps: float, dresidual: bool
) -> list[Tensor]:
    dx, dres, dweight = _norm_kernels().rms_norm_backward(dy, ds, s, weight, eps, dresidual)
    return [g for g in (dx, dweight, dres) if g is not None]


def _layer_norm_fake(x, weight, bias, residual, eps):
    y = empty_like_shape(x)
    return [y] if residual is None else [y, empty_like_shape(x)]


def _rms_norm_fake(x, weight, residual, eps):
    half = weight.dtype in (torch.float16, torch.bfloat16)
    y = empty_like_shape(x, weight.dtype if half else x.dtype)
    return [y] if residual is None else [y, empty_like_shape(x)]


def _layer_norm_backward_fake(dy, ds, s, weight, bias, eps, dresidual):
    grads = [empty_like_shape(s), empty_like_shape(weight)] + ([] if bias is None else [empty_like_shape(bias)])
    return grads + ([empty_like_shape(s)] if dresidual else [])


def _rms_norm_backward_fake(dy, ds, s, weight, eps, dresidual):
    return [empty_like_shape(s), empty_like_shape(weight)] + ([empty_like_shape(s)] if dresidual else [])


_REFERENCES = {
    "layer_norm": lambda x, w, b, r, eps: layer_norm_reference(x, w, b, r, eps=eps),
    "rms_norm": lambda x, w, r, eps: rms_norm_reference(x, w, r, eps=eps),
}


def _norm_backward_reason(s: Tensor) -> str | None:
    return _norm_kernels().norm_backward_unsupported_reason(s)  # imported once Triton is known to run


def register_norm_autograd(op, kind: str) -> None:
    """layer_norm / rms_norm, in the fastenc and fastenc_cuda namespaces: save the normalised input s (x, or the
    returned x + residual) and the weights; backward by the fused fastenc::<kind>_backward kernel, where Triton
    runs and the row fits MAX_FUSED_BWD_N, else (warned, recorded in fastenc.trace()) the vjp of the reference on s.
    The s output's gradient adds into dx and dresidual, which are equal."""
    layer = kind == "layer_norm"
    i_res = 3 if layer else 2  # position of residual among the op's inputs; eps follows it

    def setup_context(ctx, inputs, output):
        x, weight, residual, eps = inputs[0], inputs[1], inputs[i_res], inputs[i_res + 1]
        bias = inputs[2] if layer else None
        ctx.set_materialize_grads(False)  # an unused output (often the s of the last layer) sends no zeros
        ctx.save_for_backward(x if residual is None else output[1], weight, bias)
        ctx.eps, ctx.has_residual = eps, residual is not None

    def backward(ctx, grads):
        s, weight, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dy = grads[0]
        ds = grads[1] if ctx.has_residual else None
        need_x, need_r = needs[0], ctx.has_residual and needs[i_res]
        need_w, need_b = needs[1], layer and bias is not None and needs[2]
        dx = dres = dweight = dbias = None
        if dy is None:  # only the x + residual output has a gradient: it passes straight to x and residual
            dx, dres = ds, (ds.clone() if need_x and need_r and ds is not None else ds)
        elif need_x or need_r or need_w or need_b:
            why = fused_backward_reason(s, _norm_backward_reason)
            if why is None:
                both = bool(need_x and need_r)
                if layer:
                    out = fastenc_op("layer_norm_backward")(dy, ds, s, weight, bias, ctx.eps, both)
                else:
                    out = fastenc_op("rms_norm_backward")(dy, ds, s, weight, ctx.eps, both)
                dx, dweight = out[0], out[1]
                dbias = out[2] if layer and bias is not None else None
                dres = out[-1] if both else dx
            else:
                warn_fallback(f"{kind}_backward", "triton", "torch", why)
                ref = _REFERENCES[kind]
                args = (s, weight, bias, None, ctx.eps) if layer else (s, weight, None, ctx.eps)
                diff = [0] + [i for i, t in ((1, weight), (2, bias)) if t is not None and t.is_floating_point()]
                g = _vjp_grads(ref, args, diff, [dy])
                dx, dweight, dbias = g[0], g[1], g[2] if layer else None
                if ds is not None:
                    dx = dx + ds
                dres = dx.clone() if need_x and need_r else dx
        grads_in = [dx if need_x else None, dweight if need_w else None]
        if layer:
            grads_in.append(dbias if need_b else None)
        return (*grads_in, dres if need_r else None, None)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


_layer_norm_autograd = functools.partial(register_norm_autograd, kind="layer_norm")
_rms_norm_autograd = functools.partial(register_norm_autograd, kind="rms_norm")

add_ops(
    OpSpec("layer_norm", _layer_norm_launch, _layer_norm_fake, _layer_norm_autograd, _REFERENCES["layer_norm"],
           cuda_autograd=_layer_norm_autograd),
    OpSpec("rms_norm", _rms_norm_launch, _rms_norm_fake, _rms_norm_autograd, _REFERENCES["rms_norm"],
           cuda_autograd=_rms_norm_autograd),
    OpSpec("layer_norm_backward", _layer_norm_backward_launch, _layer_norm_backward_fake, register_no_double_backward),
    OpSpec("rms_norm_backward", _rms_norm_backward_launch, _rms_norm_backward_fake, register_no_double_backward),
)  # fmt: skip

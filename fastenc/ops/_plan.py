"""An op plan: the tower ops resolved once for one (backend, strict, device), for a fused model's per-layer loop.

A model's forward asks its Runtime for the plan of its device (rebuilt only when the device, the requested backend
or $FASTENC_BACKEND changes), converts its masks once with `plan.mask(...)`, and then calls prebound functions in
the loop: no backend resolution, env read or mask re-validation per op.

- backend "torch" (asked for, or "auto" off a GPU, where "auto" always picks torch): the torch backend's unchecked
  functions (`fastenc.ops._torch`: SDPA attention with one mask per forward, ...), counted in `fastenc.trace()` as
  "torch.<op>" when a trace is active and at no cost otherwise;
- any other backend: the public checked ops with `backend=` / `strict=` bound, which pick a kernel per call shape
  and fall back visibly (FallbackWarning, trace, or BackendUnavailableError when strict).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..core.dispatch import requested_backend
from ..core.trace import record, tracing
from . import _torch
from .activation import bias_activation, gated_activation
from .attention import attention
from .norm import layer_norm, rms_norm


class KernelMask:
    """Masks of one forward as the checked `fastenc.ops.attention` takes them."""

    __slots__ = ("causal", "key_padding_mask", "rel_bias_lut")

    def __init__(self, key_padding_mask, causal, rel_bias_lut=None):
        self.key_padding_mask, self.causal, self.rel_bias_lut = key_padding_mask, causal, rel_bias_lut


def _counted(op: str, fn):
    @functools.wraps(fn)
    def run(*args):
        if tracing():
            record("torch", op)
        return fn(*args)

    return run


def _linear_activation_torch(x, weight, bias, activation):
    if tracing():
        record("torch", "linear")
        record("torch", "bias_activation")
    return _torch.linear_activation(x, weight, bias, activation)


class OpPlan:
    """Prebound tower ops. Every function takes positional arguments only:
    layer_norm(x, weight, bias, eps, residual), rms_norm(x, weight, eps, residual), bias_activation(x, bias, act),
    gated_activation(gate, up, act), linear_activation(x, weight, bias, act) = act(x @ weight^T + bias),
    attention(q, k, v, mask, scale, rel_bias_table) with mask = plan.mask(...)."""

    def __init__(self, backend: str, strict: bool, device: torch.device):
        want = requested_backend(backend)
        self.torch = want == "torch" or (want == "auto" and device.type != "cuda")
        if self.torch:
            self.layer_norm = _counted("layer_norm", _torch.layer_norm)
            self.rms_norm = _counted("rms_norm", _torch.rms_norm)
            self.bias_activation = _counted("bias_activation", _torch.bias_activation)
            self.gated_activation = _counted("gated_activation", _torch.gated_activation)
            self.linear_activation = _linear_activation_torch
            return
        kw = {"backend": backend, "strict": strict}

        def ln(x, weight, bias, eps, residual=None):
            return layer_norm(x, weight, bias, eps, residual, **kw)

        def rms(x, weight, eps, residual=None):
            return rms_norm(x, weight, eps, residual, **kw)

        self.layer_norm, self.rms_norm = ln, rms
        self.bias_activation = functools.partial(bias_activation, **kw)
        self.gated_activation = functools.partial(gated_activation, **kw)
        self._kw = kw

        def linear_act(x, weight, bias, activation):
            if tracing():
                record("torch", "linear")
            return bias_activation(F.linear(x, weight), bias, activation, **kw)

        self.linear_activation = linear_act

    def untraced(self, dtype: torch.dtype, activation: str, *, inplace: bool = False):
        """(layer_norm, linear_activation(x, w, b), attention) for a loop that runs while no trace is active, over
        `dtype` activations and weights: the torch plan's are the bare kernels (fp32: F.layer_norm, the activation
        as one expression, computed in the GEMM's output when `inplace`: autograd records nothing), the others the
        same checked ops as always."""
        if self.torch:
            ln = _torch.layer_norm_fp32 if dtype == torch.float32 else _torch.layer_norm
            return ln, _torch.linear_activation_fn(dtype, activation, inplace=inplace), _torch.attention
        return self.layer_norm, functools.partial(self.linear_activation, activation=activation), self.attention

    def mask(self, key_padding_mask, causal: bool, sq: int, sk: int, device, *, rel_bias=None, dtype=None):
        """The masks of one forward, converted once. key_padding_mask: (B, Sk) bool or None. rel_bias: a T5
        (table (num_buckets, H), lut) pair shared by the layers that use this mask (torch: added to an additive
        mask in `dtype` here, once)."""
        if not self.torch:
            return KernelMask(key_padding_mask, causal, None if rel_bias is None else rel_bias[1])
        bias = None
        if rel_bias is not None:
            bias = _torch.relative_bias_reference(rel_bias[0], rel_bias[1], sq, sk)  # (1, H, Sq, Sk)
        return _torch.sdpa_mask(key_padding_mask, causal, sq, sk, device, bias=bias, dtype=dtype)

    def attention(self, q, k, v, mask, scale: float, rel_bias_table=None):
        """(B, H, Sq, D) attention under `mask` from `self.mask` (whose relative bias, if any, is `rel_bias_table`'s:
        the torch plan has it in the mask already)."""
        if self.torch:
            if tracing():
                record("torch", "attention")
            return _torch.attention(q, k, v, mask, scale)
        lut = mask.rel_bias_lut
        return attention(
            q,
            k,
            v,
            causal=mask.causal,
            key_padding_mask=mask.key_padding_mask,
            scale=scale,
            rel_bias_table=rel_bias_table if lut is not None else None,
            rel_bias_lut=lut,
            **self._kw,
        )

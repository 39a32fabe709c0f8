"""An op plan: the tower ops resolved once for one (backend, strict, device), for a fused model's per-layer loop.

A model's forward asks its ExecutionState (`model._fastenc`) for the plan of its device (rebuilt only when the
device, the requested backend or $FASTENC_BACKEND changes), converts its masks once with `plan.mask(...)`, and then
calls prebound functions in the loop: no env read, input re-validation or mask conversion per op.

- backend "torch" (asked for, or "auto" off a GPU, where "auto" always picks torch): the torch backend's unchecked
  functions (SDPA attention with one mask per forward, ...), counted in `fastenc.trace()` as "torch.<op>" when a
  trace is active and at no cost otherwise;
- any other backend: the requested backend ($FASTENC_BACKEND applied) is read once, when the plan is built; each op
  picks its kernel once per input signature (dtype, and the sizes the kernels' support rules read: hidden size;
  for attention batch, heads, head dim, key length and the biases present) and keeps the choice, so a call does a
  dict lookup, records what ran and, when the choice is a fall-back, reports it (FallbackWarning and
  `trace().fallbacks`, or BackendUnavailableError when strict) exactly as the public op would, then launches.
  The model hands over well-formed tensors, so the public ops' input checks are not repeated.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..core import cuda as _cuda
from ..core.dispatch import op_backend, requested_backend
from ..core.trace import fall_back, record, tracing
from . import activation as _activation
from . import norm as _norm
from ._library import fastenc_op, load_cuda_ops
from .attention import attention_torch, attention_triton_reason, run_attention, sdpa_mask
from .reference import relative_bias_reference


class KernelMask:
    """Masks of one forward as the kernels take them: key_padding_mask (B, Sk) bool or None."""

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


def _counted_linear_activation(x, weight, bias, activation):
    if tracing():
        record("torch", "linear")
        record("torch", "bias_activation")
    return _activation.linear_activation_torch(x, weight, bias, activation)


class OpPlan:
    """Prebound tower ops. Every function takes positional arguments only:
    layer_norm(x, weight, bias, eps, residual), rms_norm(x, weight, eps, residual), bias_activation(x, bias, act),
    gated_activation(gate, up, act), linear_activation(x, weight, bias, act) = act(x @ weight^T + bias),
    attention(q, k, v, mask, scale, rel_bias_table) with mask = plan.mask(...)."""

    def __init__(self, backend: str, strict: bool, device: torch.device):
        want = requested_backend(backend)
        self.torch = want == "torch" or (want == "auto" and device.type != "cuda")
        if self.torch:
            self.layer_norm = _counted("layer_norm", _norm.layer_norm_torch)
            self.rms_norm = _counted("rms_norm", _norm.rms_norm_torch)
            self.bias_activation = _counted("bias_activation", _activation.bias_activation_torch)
            self.gated_activation = _counted("gated_activation", _activation.gated_activation_torch)
            self.linear_activation = _counted_linear_activation
            return
        self._want, self._strict, self._device = want, strict, device
        self._choices: dict[tuple, tuple[str, str | None]] = {}  # input signature -> (backend, fall-back reason)
        self._ops: dict[str, object] = {}  # torch.ops.fastenc.<name>.default, looked up once

    # ------------------------------------------------------------------------------------------ kernel backends
    # (the torch plan's instance attributes above replace these methods)

    def _backend(self, op: str, key: tuple, triton_reason, cuda_reason=None) -> str:
        """The backend of `op` for inputs of signature `key`: decided on first sight, reported on every call."""
        try:
            choice = self._choices.get(key)
        except TypeError:  # symbolic sizes (torch.export) hash to nothing: decided in the trace, as the public op does
            choice, key = None, None
        if choice is None:
            choice = op_backend(op, self._device, self._want, triton_reason, cuda_reason)
            if key is not None and not torch.compiler.is_compiling():
                self._choices[key] = choice
        which, why = choice
        if why is not None:
            fall_back(op, self._want, which, why, strict=self._strict)
        if tracing():
            record(which, op)
        return which

    def _op(self, name: str):
        op = self._ops[name] = fastenc_op(name)
        return op

    def layer_norm(self, x, weight, bias, eps, residual=None):
        which = self._backend(
            "layer_norm",
            ("layer_norm", x.dtype, x.shape[-1]),
            lambda: _norm.norm_triton_reason(x),
            lambda: _cuda.cuda_norm_unsupported_reason(x),
        )
        if which == "torch":
            return _norm.layer_norm_torch(x, weight, bias, eps, residual)
        if which == "cuda":
            load_cuda_ops()
            y, s = _cuda.cuda_layer_norm_forward(x, weight, bias, eps, residual)
            return y if residual is None else (y, s)
        out = (self._ops.get("layer_norm") or self._op("layer_norm"))(x, weight, bias, residual, eps)
        return out[0] if residual is None else (out[0], out[1])

    def rms_norm(self, x, weight, eps, residual=None):
        which = self._backend(
            "rms_norm",
            ("rms_norm", x.dtype, x.shape[-1]),
            lambda: _norm.norm_triton_reason(x),
            lambda: _cuda.cuda_norm_unsupported_reason(x),
        )
        if which == "torch":
            return _norm.rms_norm_torch(x, weight, eps, residual)
        if which == "cuda":
            load_cuda_ops()
            y, s = _cuda.cuda_rms_norm_forward(x, weight, eps, residual)
            return y if residual is None else (y, s)
        out = (self._ops.get("rms_norm") or self._op("rms_norm"))(x, weight, residual, eps)
        return out[0] if residual is None else (out[0], out[1])

    def bias_activation(self, x, bias, activation):
        which = self._backend(
            "bias_activation",
            ("bias_activation", x.dtype, x.shape[-1]),
            lambda: _activation.activation_triton_reason(x),
            lambda: _cuda.cuda_activation_unsupported_reason(x),
        )
        if which == "torch":
            return _activation.bias_activation_torch(x, bias, activation)
        if which == "cuda":
            load_cuda_ops()
            return _cuda.cuda_bias_activation_forward(x, bias, activation)
        return (self._ops.get("bias_activation") or self._op("bias_activation"))(x, bias, activation)

    def gated_activation(self, gate, up, activation):
        which = self._backend(
            "gated_activation",
            ("gated_activation", gate.dtype, gate.shape[-1]),
            lambda: _activation.activation_triton_reason(gate),
            lambda: _cuda.cuda_activation_unsupported_reason(gate),
        )
        if which == "torch":
            return _activation.gated_activation_torch(gate, up, activation)
        if which == "cuda":
            load_cuda_ops()
            return _cuda.cuda_gated_activation_forward(gate, up, activation)
        return (self._ops.get("gated_activation") or self._op("gated_activation"))(gate, up, activation)

    def linear_activation(self, x, weight, bias, activation):
        if tracing():
            record("torch", "linear")
        return self.bias_activation(F.linear(x, weight), bias, activation)

    # ------------------------------------------------------------------------------------------ shared

    def untraced(self, dtype: torch.dtype, activation: str, *, inplace: bool = False):
        """(layer_norm, linear_activation(x, w, b), attention) for a loop that runs while no trace is active, over
        `dtype` activations and weights: the torch plan's are the bare kernels (fp32: F.layer_norm, the activation
        as one expression, computed in the GEMM's output when `inplace`: autograd records nothing), the others the
        plan's own."""
        if self.torch:
            ln = _norm.layer_norm_fp32_torch if dtype == torch.float32 else _norm.layer_norm_torch
            lin = _activation.linear_activation_fn(dtype, activation, inplace=inplace)
            return ln, lin, attention_torch
        return self.layer_norm, functools.partial(self.linear_activation, activation=activation), self.attention

    def mask(self, key_padding_mask, causal: bool, sq: int, sk: int, device, *, rel_bias=None, dtype=None):
        """The masks of one forward, converted once. key_padding_mask: (B, Sk) bool or None. rel_bias: a T5
        (table (num_buckets, H), lut) pair shared by the layers that use this mask (torch: added to an additive
        mask in `dtype` here, once)."""
        if not self.torch:
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.to(torch.bool)
            return KernelMask(key_padding_mask, causal, None if rel_bias is None else rel_bias[1])
        bias = None
        if rel_bias is not None:
            bias = relative_bias_reference(rel_bias[0], rel_bias[1], sq, sk)  # (1, H, Sq, Sk)
        return sdpa_mask(key_padding_mask, causal, sq, sk, device, bias=bias, dtype=dtype)

    def attention(self, q, k, v, mask, scale: float, rel_bias_table=None):
        """(B, H, Sq, D) attention under `mask` from `self.mask` (whose relative bias, if any, is `rel_bias_table`'s:
        the torch plan has it in the mask already)."""
        if self.torch:
            if tracing():
                record("torch", "attention")
            return attention_torch(q, k, v, mask, scale)
        lut = mask.rel_bias_lut
        table = rel_bias_table if lut is not None else None
        b, h, _, d = q.shape
        which = self._backend(
            "attention",
            ("attention", q.dtype, b, h, d, k.shape[2], None if table is None else table.dtype),
            lambda: attention_triton_reason(q, k, v, None, table),
            lambda: _cuda.cuda_attention_unsupported_reason(q, k, v, None, table),
        )
        return run_attention(which, q, k, v, mask.key_padding_mask, None, table, lut, bool(mask.causal), float(scale))

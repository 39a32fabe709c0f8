"""The torch backend of every tower op: the fastest plain-PyTorch kernel with the op's semantics, unchecked.

These are what `backend="torch"` runs (the public ops call them after their input checks; fused models call them
directly from a plan resolved once per model, see `fastenc.ops._plan`). The explicit fp32 formulas in
`fastenc.ops.reference` stay the definition the kernels and these functions are tested against.

    attention: F.scaled_dot_product_attention, causal or with a mask built once per forward (`sdpa_mask`); with a
               key-padding mask only after a finiteness check of q, k, v (CPU), else the explicit reference
    layer_norm / bias_activation: F.layer_norm / the activation in the input dtype for fp32 inputs (nothing to
               round), in fp32 with one rounding for fp16 / bf16 (the reference)
    rms_norm: F.rms_norm for fp32 inputs and weights (T5's fp32-variance rule is its math; bit-identical to the
               reference on CPU), the reference otherwise (half weights cast the normed value first)
    gated_activation: the reference
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import (
    ACTIVATION_FNS,
    activation_reference,
    attention_reference,
    bias_activation_reference,
    gated_activation_reference,
    layer_norm_reference,
    relative_bias_reference,
    rms_norm_reference,
)


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


def attention(q, k, v, m: SdpaMask, scale: float) -> torch.Tensor:
    """softmax(scale q k^T + mask) v. q: (B, H, Sq, D), k, v: (B, H, Sk, D) -> (B, H, Sq, D)."""
    if m.reference is not None and (m.mask is None or not bool((q.sum() + k.sum() + v.sum()).isfinite())):
        kpm, bias, causal = m.reference
        return attention_reference(q, k, v, kpm, bias, causal=causal, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m.mask, is_causal=m.is_causal, scale=scale)


def attention_op(
    q, k, v, key_padding_mask=None, bias=None, rel_bias_table=None, rel_bias_lut=None, *, causal=False, scale
):
    """The public op's torch backend (inputs already checked, key_padding_mask bool)."""
    sq, sk = q.shape[2], k.shape[2]
    if rel_bias_table is not None:
        rel = relative_bias_reference(rel_bias_table, rel_bias_lut, sq, sk).to(q.dtype)  # (1, H, Sq, Sk)
        bias = rel if bias is None else bias + rel
    m = sdpa_mask(key_padding_mask, causal, sq, sk, q.device, bias=bias, dtype=q.dtype)
    return attention(q, k, v, m, scale)


def layer_norm(x, weight, bias, eps: float, residual=None):
    """LayerNorm over the last dim; with residual -> (normed, x + residual). fp32 inputs: `layer_norm_fp32`."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return layer_norm_reference(x, weight, bias, residual, eps=eps)
    return layer_norm_fp32(x, weight, bias, eps, residual)


def layer_norm_fp32(x, weight, bias, eps: float, residual=None):
    """torch.layer_norm for fp32 x and weights, with nothing to check: what a fused fp32 model's loop calls."""
    if residual is None:
        return torch.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    s = x + residual
    return torch.layer_norm(s, (s.shape[-1],), weight, bias, eps), s


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


def rms_norm(x, weight, eps: float, residual=None):
    """T5LayerNorm; with residual -> (normed, x + residual)."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return rms_norm_reference(x, weight, residual, eps=eps)
    s = x if residual is None else x + residual
    y = F.rms_norm(s, (s.shape[-1],), weight, eps)
    return y if residual is None else (y, s)


def bias_activation(x, bias, activation: str):
    if x.dtype != torch.float32:
        return bias_activation_reference(x, bias, activation=activation)
    return activation_reference(x if bias is None else x + bias, activation)


def linear_activation(x, weight, bias, activation: str):
    """act(x @ weight^T + bias): the bias rides in the GEMM for fp32 (one op fewer), the reference otherwise."""
    return linear_activation_fn(x.dtype, activation)(x, weight, bias)


def gated_activation(gate, up, activation: str):
    return gated_activation_reference(gate, up, activation=activation)

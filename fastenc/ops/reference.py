"""The plain-PyTorch definitions of the tower ops, in fp32 math: what every backend (Triton, CUDA, the torch
backend's fast functions in the op files) is tested against, and what the torch backend runs where no faster torch
kernel has the same semantics. A leaf module: it imports torch and fastenc.core.errors only.

    attention_reference(q, k, v, key_padding_mask?, bias?, rel_bias_table?, rel_bias_lut?, *, causal, scale)
    attention_with_probs(same, *, dropout_p, training) -> (out, probs): the one masked softmax (output_attentions)
    layer_norm_reference(x, weight, bias?, residual?, *, eps) / rms_norm_reference(x, weight, residual?, *, eps)
    activation_reference(x, activation), bias_activation_reference(x, bias?, *, activation),
    gated_activation_reference(gate, up, *, activation)
    relative_position_buckets(...) / relative_bias_reference(table, lut, sq, sk): T5's relative-position bias
    cosine_similarity_reference(a, b, scale)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core.errors import InputError

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

ACTIVATION_FNS = {  # each activation as one expression, in its input's dtype
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": torch.relu,
}


def activation_reference(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation in fp32."""
    fn = ACTIVATION_FNS.get(activation)
    if fn is None:
        raise InputError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return fn(x)


def bias_activation_reference(x, bias=None, *, activation):
    h = x.float() if bias is None else x.float() + bias.float()
    return activation_reference(h, activation).to(x.dtype)


def gated_activation_reference(gate, up, *, activation):
    """act(gate) * up in fp32, output in gate.dtype (T5's DenseGatedActDense before `wo`)."""
    return (activation_reference(gate.float(), activation) * up.float()).to(gate.dtype)


def layer_norm_reference(x, weight, bias, residual=None, *, eps):
    """F.layer_norm over the last dim (fp32 math, output in x.dtype); with residual -> (normed, x + residual)."""
    s = x if residual is None else x + residual
    w = weight.float()
    y = F.layer_norm(s.float(), (s.shape[-1],), w, None if bias is None else bias.float(), eps).to(x.dtype)
    return y if residual is None else (y, s)


def rms_norm_reference(x, weight, residual=None, *, eps):
    """T5LayerNorm: fp32 variance, no mean, no bias; half weights cast the normed value first, as transformers."""
    s = x if residual is None else x + residual
    h = s.float() * torch.rsqrt(s.float().pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        h = h.to(weight.dtype)
    y = (weight * h).to(x.dtype if weight.dtype == torch.float32 else weight.dtype)
    return y if residual is None else (y, s)


def relative_position_buckets(
    sq: int, sk: int, *, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128, device=None
) -> torch.Tensor:
    """(Sq + Sk - 1,) int32 bucket ids of the relative distances d = j - i (key minus query position), d running
    from -(Sq - 1) to Sk - 1 and stored at index d + Sq - 1: the `rel_bias_lut` of `attention`.

    Reproduces transformers' T5Attention._relative_position_bucket exactly (same fp32 ops in the same order)."""
    d = torch.arange(-(sq - 1), sk, dtype=torch.long, device=device)  # j - i for every (i, j) pair
    buckets = torch.zeros_like(d)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (d > 0).to(torch.long) * num_buckets
        d = torch.abs(d)
    else:
        d = -torch.min(d, torch.zeros_like(d))
    max_exact = num_buckets // 2
    is_small = d < max_exact
    large = max_exact + (
        torch.log(d.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return (buckets + torch.where(is_small, d, large)).to(torch.int32)


def relative_bias_reference(table: torch.Tensor, lut: torch.Tensor, sq: int, sk: int) -> torch.Tensor:
    """The (1, H, Sq, Sk) bias the kernel never materialises: table[lut[j - i + Sq - 1], h]."""
    i = torch.arange(sq, device=table.device)[:, None]
    j = torch.arange(sk, device=table.device)[None, :]
    idx = lut.long()[j - i + sq - 1]  # (Sq, Sk)
    return table[idx].permute(2, 0, 1).unsqueeze(0)


def attention_with_probs(
    q,
    k,
    v,
    key_padding_mask=None,
    bias=None,
    rel_bias_table=None,
    rel_bias_lut=None,
    *,
    causal=False,
    scale=None,
    dropout_p=0.0,
    training=False,
):
    """`attention_reference` that also returns the probabilities: (out in q.dtype, probs (B, H, Sq, Sk) in q.dtype).
    The one masked softmax of the package: the reference, the models' output_attentions=True path and their
    attention-dropout path (dropout_p > 0 and training: dropout on the probabilities, as transformers) all run it.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    if bias is not None:
        s = s + bias.float()
    if rel_bias_table is not None:
        s = s + relative_bias_reference(rel_bias_table.float(), rel_bias_lut, s.shape[-2], s.shape[-1])
    keep = None
    if causal:
        sq, sk = s.shape[-2:]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :].to(torch.bool)
        keep = pad if keep is None else keep & pad
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    # Fully masked rows are told apart from NaN by the scores, not the probabilities: softmax gives NaN for both, and
    # p.nan_to_num(0) would also zero a row made NaN by a NaN / inf input. A row is dead when every score is -inf
    # (the mask, a -inf bias, or -inf scores; torch's _safe_softmax rule, which the Triton kernel's l == 0 matches).
    dead = (s == float("-inf")).all(dim=-1, keepdim=True)  # (B, H, Sq, 1)
    p = torch.softmax(s, dim=-1).masked_fill(dead, 0.0)
    pd = F.dropout(p, p=dropout_p, training=True) if training and dropout_p > 0 else p
    o = torch.matmul(pd, v.float()).masked_fill(dead, 0.0)  # 0, even where 0 * (NaN / inf in v) gave NaN
    return o.to(q.dtype), p.to(q.dtype)


def attention_reference(
    q, k, v, key_padding_mask=None, bias=None, rel_bias_table=None, rel_bias_lut=None, *, causal=False, scale=None
):
    """Plain-torch attention, fp32 math. Rows whose scores are all -inf (every key masked by the masks or a -inf
    bias) give 0; NaN / inf in q, k, v or the bias stay NaN / inf in the rows they reach, as in SDPA.

    q: (B, H, Sq, D), k/v: (B, H, Sk, D), key_padding_mask: (B, Sk) bool, True = attend,
    bias: broadcastable to (B, H, Sq, Sk). causal masks key j > query i (top-left aligned, as torch SDPA).
    rel_bias_table / rel_bias_lut: see the module docstring (materialised here: this is the reference).
    """
    out, _ = attention_with_probs(
        q, k, v, key_padding_mask, bias, rel_bias_table, rel_bias_lut, causal=causal, scale=scale
    )
    return out


def cosine_similarity_reference(a, b, scale=1.0):
    """The formula, fp32 math, output in a.dtype. F.normalize's eps (1e-12) makes zero rows give 0."""
    return (scale * F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T).to(a.dtype)

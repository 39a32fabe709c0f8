"""torch.library registration of every fastenc Triton kernel: one custom op per kernel in the `fastenc` namespace.

    torch.ops.fastenc.attention(q, k, v, key_padding_mask?, bias?, rel_bias_table?, rel_bias_lut?, causal, scale)
    torch.ops.fastenc.layer_norm(x, weight, bias?, residual?, eps)           -> [y] or [y, x + residual]
    torch.ops.fastenc.rms_norm(x, weight, residual?, eps)                   -> [y] or [y, x + residual]
    torch.ops.fastenc.bias_activation(x, bias?, activation)
    torch.ops.fastenc.gated_activation(gate, up, activation)
    torch.ops.fastenc.cosine_similarity_matrix(a, b, scale, fp32_out)
    torch.ops.fastenc.contrastive_row_stats(kind, a, b, scale, bias, offset)
    torch.ops.fastenc.contrastive_row_grads(kind, a, b, stat_a?, stat_b?, scale, bias, offset, coef) -> [dA, ds, db]

Each op has an explicit fake (shape/dtype/stride) implementation, so `torch.compile(..., fullgraph=True)` and
`torch.export` see one node per kernel, and a backward that differentiates the op's plain-torch reference with
`torch.func.vjp` on the saved inputs (exact gradients of the reference formula; the kernels are forward-only). The
contrastive ops are the loss's own forward/backward pieces and carry no autograd formula.

On CUDA the ops are `torch.library.triton_op`s whose launchers call kernels through `wrap_triton`, so Inductor sees
the Triton kernels themselves. Under TRITON_INTERPRET=1 they are plain `custom_op`s: torch's `wrap_triton` cannot
trace interpreted kernels, and the interpreter only runs eagerly anyway.

Registration imports triton, so it happens on first use (`register_triton_ops()`), after TRITON_INTERPRET is final.
`fastenc.optimize` registers up front, so a model compiled before its first eager call traces without a break.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import _cuda
from .._compat import compile_disabled

NAMESPACE = "fastenc"


# ------------------------------------------------------------------------------------------ reference autograd


def register_reference_autograd(op, reference: Callable[..., Tensor | Sequence[Tensor]]) -> None:
    """Give custom op `op` the backward of `reference`, a plain-torch function with the op's positional signature.

    The saved inputs are detached, so the backward builds no graph reaching the forward's inputs (no double
    backward); integer and bool tensors (masks, lookup tables) get no gradient."""

    def setup_context(ctx, inputs, output):
        pos = [i for i, a in enumerate(inputs) if isinstance(a, Tensor)]
        ctx.tensor_pos = pos
        ctx.others = {i: a for i, a in enumerate(inputs) if not isinstance(a, Tensor)}
        ctx.n_inputs = len(inputs)
        ctx.save_for_backward(*[inputs[i] for i in pos])

    def backward(ctx, *grads):
        args: list = [ctx.others.get(i) for i in range(ctx.n_inputs)]
        for i, t in zip(ctx.tensor_pos, ctx.saved_tensors, strict=True):
            args[i] = t.detach()
        diff = [i for i in ctx.tensor_pos if ctx.needs_input_grad[i] and args[i].is_floating_point()]
        out_grads = list(grads[0]) if len(grads) == 1 and isinstance(grads[0], (list, tuple)) else list(grads)

        def f(*leaves):
            a = list(args)
            for i, t in zip(diff, leaves, strict=True):
                a[i] = t
            out = reference(*a)
            return tuple(out) if isinstance(out, (list, tuple)) else (out,)

        outs, vjp_fn = torch.func.vjp(f, *[args[i] for i in diff])
        cot = tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outs, out_grads, strict=True))
        result: list = [None] * ctx.n_inputs
        for i, g in zip(diff, vjp_fn(cot), strict=True):
            result[i] = g
        return tuple(result)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


# ------------------------------------------------------------------------------------------ fakes


def _empty_like_shape(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A contiguous tensor of t's shape, as the launchers allocate their outputs."""
    return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device)


def _attention_fake(q, k, v, key_padding_mask, bias, rel_bias_table, rel_bias_lut, causal, scale):
    b, h, sq, d = q.shape
    return torch.empty(b, sq, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, H, Sq, D) view


def _layer_norm_fake(x, weight, bias, residual, eps):
    y = _empty_like_shape(x)
    return [y] if residual is None else [y, _empty_like_shape(x)]


def _rms_norm_fake(x, weight, residual, eps):
    half = weight.dtype in (torch.float16, torch.bfloat16)
    y = _empty_like_shape(x, weight.dtype if half else x.dtype)
    return [y] if residual is None else [y, _empty_like_shape(x)]


def _bias_activation_fake(x, bias, activation):
    return _empty_like_shape(x)


def _gated_activation_fake(gate, up, activation):
    return _empty_like_shape(gate)


def _cosine_fake(a, b, scale, fp32_out):
    return torch.empty(a.shape[0], b.shape[0], dtype=torch.float32 if fp32_out else a.dtype, device=a.device)


def _row_stats_fake(kind, a, b, scale, bias, offset):
    return torch.empty(a.shape[0], dtype=torch.float32, device=a.device)


def _row_grads_fake(kind, a, b, stat_a, stat_b, scale, bias, offset, coef):
    n = a.shape[0]
    return [
        torch.empty(n, a.shape[1], dtype=torch.float32, device=a.device),
        torch.empty(n, dtype=torch.float32, device=a.device),
        torch.empty(n, dtype=torch.float32, device=a.device),
    ]


# ------------------------------------------------------------------------------------------ references


def _references():
    from .reference import (
        attention_reference,
        bias_activation_reference,
        cosine_similarity_reference,
        gated_activation_reference,
        layer_norm_reference,
        rms_norm_reference,
    )

    def attention_ref(q, k, v, kpm, bias, rb_table, rb_lut, causal, scale):
        return attention_reference(q, k, v, kpm, bias, rb_table, rb_lut, causal=causal, scale=scale)

    return {
        "attention": attention_ref,
        "layer_norm": lambda x, w, b, r, eps: layer_norm_reference(x, w, b, r, eps=eps),
        "rms_norm": lambda x, w, r, eps: rms_norm_reference(x, w, r, eps=eps),
        "bias_activation": lambda x, b, act: bias_activation_reference(x, b, activation=act),
        "gated_activation": lambda g, u, act: gated_activation_reference(g, u, activation=act),
        "cosine_similarity_matrix": lambda a, b, scale, fp32_out: cosine_similarity_reference(a, b, scale).to(
            torch.float32 if fp32_out else a.dtype
        ),
    }


# ------------------------------------------------------------------------------------------ registration


def _launchers():
    """The Triton launchers with the ops' positional signatures (type hints give torch.library the schema)."""
    from ..kernels import activation as k_activation
    from ..kernels import attention as k_attention
    from ..kernels import contrastive as k_contrastive
    from ..kernels import cosine as k_cosine
    from ..kernels import norm as k_norm

    def attention_op(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_padding_mask: Tensor | None,
        bias: Tensor | None,
        rel_bias_table: Tensor | None,
        rel_bias_lut: Tensor | None,
        causal: bool,
        scale: float,
    ) -> Tensor:
        return k_attention.attention_forward(
            q,
            k,
            v,
            causal=causal,
            key_padding_mask=key_padding_mask,
            bias=bias,
            scale=scale,
            rel_bias_table=rel_bias_table,
            rel_bias_lut=rel_bias_lut,
        )

    def layer_norm_op(
        x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, eps: float
    ) -> list[Tensor]:
        y, s = k_norm.layer_norm_forward(x, weight, bias, eps, residual)
        return [y] if s is None else [y, s]

    def rms_norm_op(x: Tensor, weight: Tensor, residual: Tensor | None, eps: float) -> list[Tensor]:
        y, s = k_norm.rms_norm_forward(x, weight, eps, residual)
        return [y] if s is None else [y, s]

    def bias_activation_op(x: Tensor, bias: Tensor | None, activation: str) -> Tensor:
        return k_activation.bias_activation_forward(x, bias, activation)

    def gated_activation_op(gate: Tensor, up: Tensor, activation: str) -> Tensor:
        return k_activation.gated_activation_forward(gate, up, activation)

    def cosine_op(a: Tensor, b: Tensor, scale: float, fp32_out: bool) -> Tensor:
        return k_cosine.cosine_similarity_forward(a, b, scale=scale, out_dtype=torch.float32 if fp32_out else None)

    def row_stats_op(kind: str, a: Tensor, b: Tensor, scale: float, bias: float, offset: int) -> Tensor:
        return k_contrastive.contrastive_row_stats(kind, a, b, scale=scale, bias=bias, offset=offset)

    def row_grads_op(
        kind: str,
        a: Tensor,
        b: Tensor,
        stat_a: Tensor | None,
        stat_b: Tensor | None,
        scale: float,
        bias: float,
        offset: int,
        coef: float,
    ) -> list[Tensor]:
        grads = k_contrastive.contrastive_row_grads(
            kind, a, b, stat_a, stat_b, scale=scale, bias=bias, offset=offset, coef=coef
        )
        return list(grads)

    return {
        "attention": (attention_op, _attention_fake),
        "layer_norm": (layer_norm_op, _layer_norm_fake),
        "rms_norm": (rms_norm_op, _rms_norm_fake),
        "bias_activation": (bias_activation_op, _bias_activation_fake),
        "gated_activation": (gated_activation_op, _gated_activation_fake),
        "cosine_similarity_matrix": (cosine_op, _cosine_fake),
        "contrastive_row_stats": (row_stats_op, _row_stats_fake),
        "contrastive_row_grads": (row_grads_op, _row_grads_fake),
    }


TRITON_OPS = (
    "attention",
    "layer_norm",
    "rms_norm",
    "bias_activation",
    "gated_activation",
    "cosine_similarity_matrix",
    "contrastive_row_stats",
    "contrastive_row_grads",
)


_registered = False


@compile_disabled
def register_triton_ops() -> tuple[str, ...]:
    """Register every Triton kernel as torch.ops.fastenc.<name> (once per process); returns the op names."""
    global _registered
    if _registered:
        return TRITON_OPS
    from .._dispatch import kernel_module
    from ..kernels._common import interpreting

    for family in ("activation", "attention", "contrastive", "cosine", "norm"):
        kernel_module(family)  # imported now, so the ops' shape checks are dict lookups under torch.compile

    make = torch.library.custom_op if interpreting() else torch.library.triton_op
    refs = _references()
    for name, (fn, fake) in _launchers().items():
        op = make(f"{NAMESPACE}::{name}", fn, mutates_args=())
        op.register_fake(fake)
        if name in refs:
            register_reference_autograd(op, refs[name])
    _registered = True
    return TRITON_OPS


def fastenc_op(name: str):
    """torch.ops.fastenc.<name>.default, registering the Triton ops first if needed (a module flag, so a compiled
    caller that runs after registration traces no registration code)."""
    if not _registered:
        register_triton_ops()
    return getattr(getattr(torch.ops, NAMESPACE), name).default


# ------------------------------------------------------------------------------------------ CUDA ops


CUDA_OPS = ("layer_norm", "rms_norm", "bias_activation", "gated_activation", "attention")


def _cuda_references():
    """References of csrc/bindings.cpp's torch.ops.fastenc_cuda ops: the same schemas as the Triton ops', so the same
    references (tests/test_cuda_build.py checks the schemas are equal)."""
    refs = _references()
    return {name: refs[name] for name in CUDA_OPS}


def register_cuda_autograd() -> None:
    """Backward formulas (vjp of the reference) for the CUDA extension's ops; run by `fastenc._cuda` once, right
    after loading the extension and registering its fakes (hooked in below: `_cuda` imports nothing from ops)."""
    for name, ref in _cuda_references().items():
        register_reference_autograd(f"fastenc_cuda::{name}", ref)


_cuda.on_load(register_cuda_autograd)

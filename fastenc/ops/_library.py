"""torch.library registration of every fastenc Triton kernel: one custom op per kernel in the `fastenc` namespace.

    torch.ops.fastenc.attention(q, k, v, key_padding_mask?, bias?, rel_bias_table?, rel_bias_lut?, causal, scale)
    torch.ops.fastenc.attention_fwd_stats(same)                              -> (out, stats (B, H, 2, Sq) fp32)
    torch.ops.fastenc.attention_backward(dout, q, k, v, out, stats, key_padding_mask?, bias?, rel_bias_table?,
        rel_bias_lut?, causal, scale, bias_grad, table_grad)                 -> [dq, dk, dv, dbias?, dtable?]
    torch.ops.fastenc.layer_norm(x, weight, bias?, residual?, eps)           -> [y] or [y, x + residual]
    torch.ops.fastenc.rms_norm(x, weight, residual?, eps)                   -> [y] or [y, x + residual]
    torch.ops.fastenc.bias_activation(x, bias?, activation)
    torch.ops.fastenc.gated_activation(gate, up, activation)
    torch.ops.fastenc.layer_norm_backward(dy, ds?, s, weight, bias?, eps, dresidual) -> [dx, dw, db?, dresidual?]
    torch.ops.fastenc.rms_norm_backward(dy, ds?, s, weight, eps, dresidual)           -> [dx, dw, dresidual?]
    torch.ops.fastenc.bias_activation_backward(dy, x, bias?, activation)            -> [dx, dbias?]
    torch.ops.fastenc.gated_activation_backward(dy, gate, up, activation)           -> [dgate, dup]
    torch.ops.fastenc.cosine_similarity_matrix(a, b, scale, fp32_out)
    torch.ops.fastenc.contrastive_row_stats(kind, a, b, scale, bias, offset)
    torch.ops.fastenc.contrastive_row_grads(kind, a, b, stat_a?, stat_b?, scale, bias, offset, coef) -> [dA, ds, db]

Each op has an explicit fake (shape/dtype/stride) implementation, so `torch.compile(..., fullgraph=True)` and
`torch.export` see one node per kernel, and a backward: for cosine_similarity_matrix the op's plain-torch reference
differentiated with `torch.func.vjp` on the saved inputs (exact gradients of the reference formula), for the others
fused kernels (below). The contrastive ops are the loss's own forward/backward pieces and carry no autograd formula.

Norms and activations have fused backwards (kernels/norm.py, kernels/activation.py, "Backward"): the forward op
saves its input (for a norm with residual, the x + residual it returned, so statistics are recomputed from exactly
what was normalised) and its backward calls the matching `*_backward` op; where Triton cannot run it (no CUDA and no
interpreter; norm rows wider than MAX_FUSED_BWD_N) the reference's vjp runs instead, warned and recorded as a
fall-back. The `*_backward` ops raise DoubleBackwardError if differentiated. The CUDA extension's norm and
activation ops use the same backwards.

Attention is the exception: its backward is the fused Triton kernel pair (kernels/attention.py, "Backward"), never
the reference. `attention_fwd_stats` saves its (out, stats) and its backward calls `attention_backward`;
`fastenc::attention` (what the inference path and direct op users call) saves only its inputs and recomputes (out,
stats) with `attention_fwd_stats` in its backward, so a forward under no autograd pays nothing. `fastenc.ops.attention`
calls `attention_fwd_stats` when a gradient will be needed. The CUDA extension's `fastenc_cuda::attention` uses the
same recompute backward on Triton. Differentiating `attention_backward` raises DoubleBackwardError.

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

from ..core import cuda as _cuda
from ..core.compat import compile_disabled

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


# ------------------------------------------------------------------------------------------ attention autograd

_ATTN_INPUTS = ("q", "k", "v", "key_padding_mask", "bias", "rel_bias_table", "rel_bias_lut", "causal", "scale")


def _attention_grads(args, needs, dout, out=None, stats=None) -> tuple:
    """The nine input gradients of attention(*args) for output gradient `dout`, by the fused Triton backward:
    `out` / `stats` from `attention_fwd_stats` (recomputed here when None: one forward, O(S) memory)."""
    q, k, v, kpm, bias, table, lut, causal, scale = args
    if dout is None or not any(needs):
        return (None,) * len(_ATTN_INPUTS)
    if out is None:
        out, stats = fastenc_op("attention_fwd_stats")(q, k, v, kpm, bias, table, lut, causal, scale)
    bias_grad = bias is not None and needs[4]
    table_grad = table is not None and needs[5]
    grads = fastenc_op("attention_backward")(
        dout, q, k, v, out, stats, kpm, bias, table, lut, causal, scale, bias_grad, table_grad
    )
    from ..core.trace import record

    record("triton", "attention_backward")  # this thread's trace(); CUDA runs backward on its own device thread
    dq, dk, dv, *rest = grads
    dbias = rest.pop(0) if bias_grad else None
    dtable = rest.pop(0) if table_grad else None
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, None, dbias, dtable,
            None, None, None)  # fmt: skip


def _register_attention_saved_autograd(op) -> None:
    """attention_fwd_stats: save (inputs, out, stats); stats is not differentiable."""

    def setup_context(ctx, inputs, output):
        q, k, v, kpm, bias, table, lut, causal, scale = inputs
        out, stats = output
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no zeros for the stats' (absent) gradient
        ctx.save_for_backward(q, k, v, kpm, bias, table, lut, out, stats)
        ctx.causal, ctx.scale = causal, scale

    def backward(ctx, dout, _dstats):
        q, k, v, kpm, bias, table, lut, out, stats = ctx.saved_tensors
        args = (q, k, v, kpm, bias, table, lut, ctx.causal, ctx.scale)
        return _attention_grads(args, ctx.needs_input_grad, dout, out, stats)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def _register_attention_recompute_autograd(op, fallback: Callable[..., Tensor] | None = None) -> None:
    """fastenc::attention / fastenc_cuda::attention: save the inputs only, recompute (out, stats) in backward.
    `fallback` (a reference with the op's signature) runs through torch.func.vjp where Triton cannot."""

    def setup_context(ctx, inputs, output):
        q, k, v, kpm, bias, table, lut, causal, scale = inputs
        ctx.save_for_backward(q, k, v, kpm, bias, table, lut)
        ctx.causal, ctx.scale = causal, scale

    def backward(ctx, dout):
        q, k, v, kpm, bias, table, lut = ctx.saved_tensors
        args = (q, k, v, kpm, bias, table, lut, ctx.causal, ctx.scale)
        needs = ctx.needs_input_grad
        if fallback is not None:
            from ..kernels import attention as k_attention

            reason = k_attention.attention_unsupported_reason(q, k, v, bias, table)
            if reason is not None:
                diff = [i for i in (0, 1, 2, 4, 5) if args[i] is not None and needs[i]]

                def f(*leaves):
                    a = list(args)
                    for i, t in zip(diff, leaves, strict=True):
                        a[i] = t
                    return fallback(*a)

                _, vjp_fn = torch.func.vjp(f, *[args[i].detach() for i in diff])
                result: list = [None] * len(_ATTN_INPUTS)
                for i, g in zip(diff, vjp_fn(dout), strict=True):
                    result[i] = g
                return tuple(result)
        return _attention_grads(args, needs, dout)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def _register_attention_no_double_backward(op) -> None:
    """attention_backward: gradients taken with create_graph=True are right; differentiating them raises."""

    def backward(ctx, *grads):
        from ..core.errors import DoubleBackwardError

        raise DoubleBackwardError(
            "fastenc attention's fused backward is not differentiable (create_graph=True gives the gradients; a "
            "second derivative needs the torch backend, backend='torch')"
        )

    torch.library.register_autograd(op, backward, setup_context=lambda ctx, inputs, output: None)


# ------------------------------------------------------------------------------------------ norm / activation autograd


def _vjp_grads(reference, args, diff, out_grads) -> list:
    """Gradients of reference(*args) w.r.t. args[i] for i in diff (torch.func.vjp on detached inputs; a None output
    gradient counts as zeros), as a list over all args (None where not in diff)."""

    def f(*leaves):
        a = list(args)
        for i, t in zip(diff, leaves, strict=True):
            a[i] = t
        out = reference(*a)
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)

    outs, vjp_fn = torch.func.vjp(f, *[args[i].detach() for i in diff])
    cot = tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outs, out_grads, strict=True))
    result: list = [None] * len(args)
    for i, g in zip(diff, vjp_fn(cot), strict=True):
        result[i] = g
    return result


def _fused_backward_reason(t: Tensor, check: Callable[[Tensor], str | None] | None = None) -> str | None:
    """None if the Triton backward kernels can run on tensors like t (Triton runs on t's device and `check(t)`,
    a kernel module's shape check, passes), else why not."""
    from ..core.dispatch import _triton_can_run

    why = _triton_can_run(t.device)
    if why is None and check is not None:
        why = check(t)
    return why


def _norm_backward_reason(s: Tensor) -> str | None:
    from ..kernels import norm as k_norm  # imported once Triton is known to run

    return k_norm.norm_backward_unsupported_reason(s)


def _register_norm_autograd(op, kind: str) -> None:
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
            why = _fused_backward_reason(s, _norm_backward_reason)
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
                from ..core.trace import warn_fallback

                warn_fallback(f"{kind}_backward", "triton", "torch", why)
                ref = _references()[kind]
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


def _register_activation_autograd(op, kind: str) -> None:
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
        why = _fused_backward_reason(a)
        if why is None:
            out = fastenc_op(f"{kind}_backward")(dy, a, b, ctx.activation)
            ga, gb = out[0], (out[1] if len(out) > 1 else None)
        else:
            from ..core.trace import warn_fallback

            warn_fallback(f"{kind}_backward", "triton", "torch", why)
            args = (a, b, ctx.activation)
            g = _vjp_grads(_references()[kind], args, [i for i in (0, 1) if args[i] is not None], [dy])
            ga, gb = g[0], g[1]
        return ga if needs[0] else None, gb if needs[1] else None, None

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def _register_no_double_backward(op) -> None:
    """The fused backward ops are not differentiable themselves: a second derivative raises DoubleBackwardError."""

    name = getattr(op, "_qualname", op)  # a CustomOpDef or "namespace::name"

    def backward(ctx, *grads):
        from ..core.errors import DoubleBackwardError

        raise DoubleBackwardError(
            f"{name}: fastenc's fused norm / activation backward is not differentiable (create_graph=True gives the "
            "gradients; a second derivative needs the torch backend, backend='torch')"
        )

    torch.library.register_autograd(op, backward, setup_context=lambda ctx, inputs, output: None)


FUSED_AUTOGRAD = {
    "attention": _register_attention_recompute_autograd,
    "attention_fwd_stats": _register_attention_saved_autograd,
    "attention_backward": _register_attention_no_double_backward,
    "layer_norm": lambda op: _register_norm_autograd(op, "layer_norm"),
    "rms_norm": lambda op: _register_norm_autograd(op, "rms_norm"),
    "bias_activation": lambda op: _register_activation_autograd(op, "bias_activation"),
    "gated_activation": lambda op: _register_activation_autograd(op, "gated_activation"),
    "layer_norm_backward": _register_no_double_backward,
    "rms_norm_backward": _register_no_double_backward,
    "bias_activation_backward": _register_no_double_backward,
    "gated_activation_backward": _register_no_double_backward,
}


# ------------------------------------------------------------------------------------------ fakes


def _empty_like_shape(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A contiguous tensor of t's shape, as the launchers allocate their outputs."""
    return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device)


def _attention_fake(q, k, v, key_padding_mask, bias, rel_bias_table, rel_bias_lut, causal, scale):
    b, h, sq, d = q.shape
    return torch.empty(b, sq, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, H, Sq, D) view


def _attention_fwd_stats_fake(q, k, v, key_padding_mask, bias, rel_bias_table, rel_bias_lut, causal, scale):
    b, h, sq, d = q.shape
    out = torch.empty(b, sq, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, H, Sq, D) view
    return out, torch.empty(b, h, 2, sq, dtype=torch.float32, device=q.device)


def _attention_backward_fake(
    dout, q, k, v, out, stats, key_padding_mask, bias, rel_bias_table, rel_bias_lut, causal, scale, bias_grad,
    table_grad,
):  # fmt: skip
    b, h, sq, d = q.shape
    sk = k.shape[2]
    grads = [
        torch.empty(b, h, sq, d, dtype=q.dtype, device=q.device),
        torch.empty(b, h, sk, d, dtype=k.dtype, device=q.device),
        torch.empty(b, h, sk, d, dtype=v.dtype, device=q.device),
    ]
    if bias_grad and bias is not None:
        grads.append(torch.empty(bias.shape, dtype=bias.dtype, device=q.device))
    if table_grad and rel_bias_table is not None:
        grads.append(torch.empty(rel_bias_table.shape, dtype=rel_bias_table.dtype, device=q.device))
    return grads


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


def _layer_norm_backward_fake(dy, ds, s, weight, bias, eps, dresidual):
    grads = [_empty_like_shape(s), _empty_like_shape(weight)] + ([] if bias is None else [_empty_like_shape(bias)])
    return grads + ([_empty_like_shape(s)] if dresidual else [])


def _rms_norm_backward_fake(dy, ds, s, weight, eps, dresidual):
    return [_empty_like_shape(s), _empty_like_shape(weight)] + ([_empty_like_shape(s)] if dresidual else [])


def _bias_activation_backward_fake(dy, x, bias, activation):
    return [_empty_like_shape(x)] + ([] if bias is None else [_empty_like_shape(bias)])


def _gated_activation_backward_fake(dy, gate, up, activation):
    return [_empty_like_shape(gate), _empty_like_shape(gate)]


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

    def attention_fwd_stats_op(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_padding_mask: Tensor | None,
        bias: Tensor | None,
        rel_bias_table: Tensor | None,
        rel_bias_lut: Tensor | None,
        causal: bool,
        scale: float,
    ) -> tuple[Tensor, Tensor]:
        out, stats = k_attention.attention_forward(
            q, k, v, causal=causal, key_padding_mask=key_padding_mask, bias=bias, scale=scale,
            rel_bias_table=rel_bias_table, rel_bias_lut=rel_bias_lut, return_stats=True,
        )  # fmt: skip
        return out, stats

    def attention_backward_op(
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        stats: Tensor,
        key_padding_mask: Tensor | None,
        bias: Tensor | None,
        rel_bias_table: Tensor | None,
        rel_bias_lut: Tensor | None,
        causal: bool,
        scale: float,
        bias_grad: bool,
        table_grad: bool,
    ) -> list[Tensor]:
        dq, dk, dv, dbias, dtable = k_attention.attention_backward(
            dout, q, k, v, out, stats, causal=causal, key_padding_mask=key_padding_mask, bias=bias, scale=scale,
            rel_bias_table=rel_bias_table, rel_bias_lut=rel_bias_lut, bias_grad=bias_grad, table_grad=table_grad,
        )  # fmt: skip
        return [dq, dk, dv] + [g for g in (dbias, dtable) if g is not None]

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

    def layer_norm_backward_op(
        dy: Tensor, ds: Tensor | None, s: Tensor, weight: Tensor, bias: Tensor | None, eps: float, dresidual: bool
    ) -> list[Tensor]:
        dx, dres, dweight, dbias = k_norm.layer_norm_backward(dy, ds, s, weight, bias, eps, dresidual)
        return [g for g in (dx, dweight, dbias, dres) if g is not None]

    def rms_norm_backward_op(
        dy: Tensor, ds: Tensor | None, s: Tensor, weight: Tensor, eps: float, dresidual: bool
    ) -> list[Tensor]:
        dx, dres, dweight = k_norm.rms_norm_backward(dy, ds, s, weight, eps, dresidual)
        return [g for g in (dx, dweight, dres) if g is not None]

    def bias_activation_backward_op(dy: Tensor, x: Tensor, bias: Tensor | None, activation: str) -> list[Tensor]:
        dx, dbias = k_activation.bias_activation_backward(dy, x, bias, activation)
        return [dx] if dbias is None else [dx, dbias]

    def gated_activation_backward_op(dy: Tensor, gate: Tensor, up: Tensor, activation: str) -> list[Tensor]:
        return list(k_activation.gated_activation_backward(dy, gate, up, activation))

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
        "attention_fwd_stats": (attention_fwd_stats_op, _attention_fwd_stats_fake),
        "attention_backward": (attention_backward_op, _attention_backward_fake),
        "layer_norm": (layer_norm_op, _layer_norm_fake),
        "rms_norm": (rms_norm_op, _rms_norm_fake),
        "bias_activation": (bias_activation_op, _bias_activation_fake),
        "gated_activation": (gated_activation_op, _gated_activation_fake),
        "layer_norm_backward": (layer_norm_backward_op, _layer_norm_backward_fake),
        "rms_norm_backward": (rms_norm_backward_op, _rms_norm_backward_fake),
        "bias_activation_backward": (bias_activation_backward_op, _bias_activation_backward_fake),
        "gated_activation_backward": (gated_activation_backward_op, _gated_activation_backward_fake),
        "cosine_similarity_matrix": (cosine_op, _cosine_fake),
        "contrastive_row_stats": (row_stats_op, _row_stats_fake),
        "contrastive_row_grads": (row_grads_op, _row_grads_fake),
    }


TRITON_OPS = (
    "attention",
    "attention_fwd_stats",
    "attention_backward",
    "layer_norm",
    "rms_norm",
    "bias_activation",
    "gated_activation",
    "layer_norm_backward",
    "rms_norm_backward",
    "bias_activation_backward",
    "gated_activation_backward",
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
    # every kernel module imported now, so the ops' lazy `from ..kernels import <family>` are sys.modules hits
    from ..kernels import activation, attention, contrastive, cosine, norm  # noqa: F401
    from ..kernels._common import interpreting

    make = torch.library.custom_op if interpreting() else torch.library.triton_op
    refs = _references()
    for name, (fn, fake) in _launchers().items():
        op = make(f"{NAMESPACE}::{name}", fn, mutates_args=())
        op.register_fake(fake)
        if name in FUSED_AUTOGRAD:
            FUSED_AUTOGRAD[name](op)
        elif name in refs:
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
    """Backward formulas (vjp of the reference) for the CUDA extension's ops; run by `fastenc.core.cuda` once, right
    after loading the extension and registering its fakes (hooked in below: `_cuda` imports nothing from ops)."""
    for name, ref in _cuda_references().items():
        if name == "attention":  # the fused Triton backward where Triton runs (CUDA tensors), else the reference
            _register_attention_recompute_autograd(f"fastenc_cuda::{name}", fallback=ref)
        elif name in FUSED_AUTOGRAD:  # norms, activations: the fused Triton backward where it runs, else the reference
            FUSED_AUTOGRAD[name](f"fastenc_cuda::{name}")
        else:
            register_reference_autograd(f"fastenc_cuda::{name}", ref)


_cuda.on_load(register_cuda_autograd)

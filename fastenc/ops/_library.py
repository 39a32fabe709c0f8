"""torch.library machinery shared by every op: one custom op per Triton kernel in the `fastenc` namespace.

Each op file (`attention.py`, `norm.py`, `activation.py`, `cosine.py`, `contrastive.py`) declares its custom ops as
`OpSpec`s (name, launcher with the op's typed positional signature, fake, backward registration or reference) with
`add_ops(...)`, at import; `fastenc.ops` imports every op file, so the specs are all known before anything here runs.
This module holds what is not one op's: the registration loop (`register_triton_ops`, on first use: it imports
triton, after TRITON_INTERPRET is final), the `torch.ops.fastenc` lookup (`fastenc_op`), the one backward that
differentiates an op's reference (`register_reference_autograd`, `_vjp_grads`), the one no-double-backward rule
(`register_no_double_backward`), and the backward registration of the CUDA extension's `torch.ops.fastenc_cuda` ops
(`load_cuda_ops`, run by the op files before their first CUDA call).

On CUDA the ops are `torch.library.triton_op`s whose launchers call kernels through `wrap_triton`, so Inductor sees
the Triton kernels themselves. Under TRITON_INTERPRET=1 they are plain `custom_op`s: torch's `wrap_triton` cannot
trace interpreted kernels, and the interpreter only runs eagerly anyway. Every op has an explicit fake
(shape / dtype / stride), so `torch.compile(..., fullgraph=True)` and `torch.export` see one node per kernel.
`fastenc.optimize` registers up front, so a model compiled before its first eager call traces without a break.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import cuda as _cuda
from ..core.compat import compile_disabled
from ..core.errors import DoubleBackwardError

NAMESPACE = "fastenc"


@dataclass(frozen=True)
class OpSpec:
    """One `torch.ops.fastenc.<name>` op. launcher: the Triton launcher with the op's positional signature (its type
    hints give torch.library the schema); fake: the outputs' shapes / dtypes / strides; autograd(op): registers the
    backward on `op` (a CustomOpDef or "namespace::name"), else reference (same signature) is differentiated; with
    neither the op has no backward. cuda_autograd: the backward of `fastenc_cuda::<name>` (csrc/bindings.cpp, same
    schema), for ops the CUDA extension has."""

    name: str
    launcher: Callable
    fake: Callable
    autograd: Callable[[object], None] | None = None
    reference: Callable | None = None
    cuda_autograd: Callable[[object], None] | None = None


SPECS: dict[str, OpSpec] = {}
FUSED_AUTOGRAD: dict[str, Callable[[object], None]] = {}  # op name -> its backward registration (fused kernels)


def add_ops(*specs: OpSpec) -> None:
    """Declare custom ops (an op file's, at its import)."""
    for spec in specs:
        SPECS[spec.name] = spec
        if spec.autograd is not None:
            FUSED_AUTOGRAD[spec.name] = spec.autograd


def _references() -> dict[str, Callable]:
    """op name -> its reference with the op's positional signature."""
    return {name: s.reference for name, s in SPECS.items() if s.reference is not None}


def fakes() -> dict[str, Callable]:
    """op name -> its fake implementation."""
    return {name: s.fake for name, s in SPECS.items()}


def empty_like_shape(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A contiguous tensor of t's shape, as the launchers allocate their outputs."""
    return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device)


# ------------------------------------------------------------------------------------------ backward helpers


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
            args[i] = t
        diff = [i for i in ctx.tensor_pos if ctx.needs_input_grad[i] and args[i].is_floating_point()]
        out_grads = list(grads[0]) if len(grads) == 1 and isinstance(grads[0], (list, tuple)) else list(grads)
        return tuple(_vjp_grads(reference, args, diff, out_grads))

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def raise_double_backward(what: str) -> None:
    """The one no-double-backward rule: gradients taken with create_graph=True are right; differentiating them
    raises DoubleBackwardError naming `what`."""
    raise DoubleBackwardError(
        f"{what}: fastenc's fused backward is not differentiable (create_graph=True gives the gradients; a second "
        "derivative needs the torch backend, backend='torch')"
    )


def register_no_double_backward(op) -> None:
    """A fused `*_backward` op: differentiating it raises DoubleBackwardError."""
    name = getattr(op, "_qualname", op)  # a CustomOpDef or "namespace::name"

    def backward(ctx, *grads):
        raise_double_backward(str(name))

    torch.library.register_autograd(op, backward, setup_context=lambda ctx, inputs, output: None)


def fused_backward_reason(t: Tensor, check: Callable[[Tensor], str | None] | None = None) -> str | None:
    """None if the Triton backward kernels can run on tensors like t (Triton runs on t's device and `check(t)`,
    a kernel module's shape check, passes), else why not."""
    from ..core.dispatch import _triton_can_run

    why = _triton_can_run(t.device)
    if why is None and check is not None:
        why = check(t)
    return why


# ------------------------------------------------------------------------------------------ registration


_registered = False


@compile_disabled
def register_triton_ops() -> tuple[str, ...]:
    """Register every Triton kernel as torch.ops.fastenc.<name> (once per process); returns the op names."""
    global _registered
    if _registered:
        return TRITON_OPS
    # every kernel module imported now, so the launchers' lazy `from ..kernels import <family>` are sys.modules hits
    from ..kernels import activation, attention, contrastive, cosine, norm  # noqa: F401
    from ..kernels._common import interpreting

    make = torch.library.custom_op if interpreting() else torch.library.triton_op
    for spec in SPECS.values():
        op = make(f"{NAMESPACE}::{spec.name}", spec.launcher, mutates_args=())
        op.register_fake(spec.fake)
        if spec.autograd is not None:
            spec.autograd(op)
        elif spec.reference is not None:
            register_reference_autograd(op, spec.reference)
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

_cuda_autograd = False


@compile_disabled
def _register_cuda_autograd() -> None:
    global _cuda_autograd
    if _cuda_autograd:
        return
    for name in CUDA_OPS:
        spec = SPECS[name]
        if spec.cuda_autograd is not None:
            spec.cuda_autograd(f"fastenc_cuda::{name}")
        else:
            register_reference_autograd(f"fastenc_cuda::{name}", spec.reference)
    _cuda_autograd = True


def load_cuda_ops() -> None:
    """Load the CUDA extension (`fastenc.core.cuda.extension()`: raises BackendUnavailableError when it cannot) and
    give its torch.ops.fastenc_cuda ops their backward formulas, once: the op files call this before a CUDA launch."""
    if not _cuda_autograd:
        _cuda.extension()
        _register_cuda_autograd()


TRITON_OPS: tuple[str, ...] = ()  # filled by `fastenc.ops` once every op file has declared its ops


def _seal() -> None:
    """Record the op names (fastenc/ops/__init__.py calls this after importing every op file)."""
    global TRITON_OPS
    TRITON_OPS = tuple(SPECS)

"""Input checks and the autograd wrapper shared by the ops."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import InputError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
    device: torch.device | None = None,
) -> None:
    """Raise InputError naming `name` unless `t` is a tensor of the given rank, dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        ok = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in ok:
            raise InputError(f"{name} must have {' or '.join(map(str, ok))} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise InputError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise InputError(f"{name} is on {t.device} but the other inputs are on {device}")


def check_same_dtype(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise InputError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def _needs_grad(tensors: Sequence[torch.Tensor | None]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _KernelForwardReferenceBackward(torch.autograd.Function):
    """Forward runs the kernel; backward re-runs the plain-torch reference on the saved inputs and differentiates it.

    Gradients are those of the reference formula, exact to the reference's own rounding. Kernel backward passes
    (tiled, no S x S intermediate) replace this per op as they land.
    """

    @staticmethod
    def forward(ctx, kernel_fn, reference_fn, *tensors):
        ctx.reference_fn = reference_fn
        ctx.save_for_backward(*tensors)
        return kernel_fn(*tensors)

    @staticmethod
    def backward(ctx, *grads):
        inputs = [
            None if t is None else t.detach().requires_grad_(need)
            for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[2:], strict=True)
        ]
        with torch.enable_grad():
            out = ctx.reference_fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None and o.requires_grad]
        wrt = [t for t in inputs if t is not None and t.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True))
        return (None, None, *[next(got) if t is not None and t.requires_grad else None for t in inputs])


def run_kernel(
    kernel_fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    reference_fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    *tensors: torch.Tensor | None,
):
    """kernel_fn(*tensors); differentiable through reference_fn(*tensors) when autograd needs it."""
    if not _needs_grad(tensors):
        return kernel_fn(*tensors)
    return _KernelForwardReferenceBackward.apply(kernel_fn, reference_fn, *tensors)

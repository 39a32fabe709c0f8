"""Input checks shared by the ops."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.errors import InputError

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

"""Small shims over torch APIs that fastenc must call lazily."""

from __future__ import annotations

import functools

import torch


def compile_disabled(fn):
    """`torch.compiler.disable(fn)`, applied at the first call: torch.compiler.disable imports torch._dynamo, which
    imports triton, and triton fixes TRITON_INTERPRET when imported, so nothing may do that at `import fastenc`."""
    state: dict = {}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        f = state.get("fn")
        if f is None:
            f = state["fn"] = torch.compiler.disable(fn)
        return f(*args, **kwargs)

    return wrapper

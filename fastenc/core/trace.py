"""`fastenc.trace()` and the package's one fall-back policy.

    with fastenc.trace() as t: ...       # t.counts["triton.attention"], t.fallbacks: what ran, what fell back
    record(backend, op)                  # an op ran on `backend` (counted in every active trace of this thread)
    tracing()                            # cheap test for hot paths: is any trace active here?
    fall_back(op, want, chosen, why, strict=...)   # warn + record, or raise BackendUnavailableError when strict

Ops, models, CUDA graphs and the transformers integration all report through these. Imports torch and
fastenc.core.errors only.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch

from .errors import BackendUnavailableError

_warned: set[tuple[str, str, str]] = set()


def fall_back(op: str, want: str, chosen: str, why: str, *, strict: bool = False) -> None:
    """The package's one fall-back policy, for ops, models, CUDA graphs and the transformers integration: `op` was
    asked to run on `want` and runs on `chosen` instead, because `why`. strict=True raises BackendUnavailableError;
    otherwise the fall-back is recorded in every active `fastenc.trace()` and a FallbackWarning is issued (once per
    (op, requested backend, reason))."""
    if strict:
        raise BackendUnavailableError(
            f"{op} cannot run on {want!r}: {why}; strict=True forbids falling back to {chosen!r}"
        )
    warn_fallback(op, want, chosen, why)


def warn_fallback(op: str, want: str, chosen: str, why: str) -> None:
    """Record a fall-back in every active trace and warn once per (op, requested backend, reason)."""
    for t in _active_traces():
        t.fallbacks.append(Fallback(op, want, chosen, why))
    key = (op, want, why)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"fastenc: {op} falls back from {want} to {chosen}: {why}", FallbackWarning, stacklevel=4)


class FallbackWarning(UserWarning):
    """An op ran on a slower backend than the one requested."""


@dataclass
class Fallback:
    op: str
    requested: str
    ran: str
    reason: str


@dataclass
class Trace:
    """What ran inside a `fastenc.trace()` block: counts["triton.attention"] == number of calls."""

    counts: Counter = field(default_factory=Counter)
    fallbacks: list[Fallback] = field(default_factory=list)

    def backends(self) -> dict[str, str]:
        """op -> comma-joined backends that ran it."""
        by_op: dict[str, list[str]] = {}
        for key in self.counts:
            b, op = key.split(".", 1)
            by_op.setdefault(op, []).append(b)
        return {op: ",".join(sorted(bs)) for op, bs in sorted(by_op.items())}


_local = threading.local()


def _active_traces() -> list[Trace]:
    return getattr(_local, "traces", [])


@contextlib.contextmanager
def trace():
    """Count the kernels that run inside the block (nested blocks each see every call)."""
    t = Trace()
    stack = list(_active_traces())
    _local.traces = stack + [t]
    _open_traces[0] += 1
    try:
        yield t
    finally:
        _open_traces[0] -= 1
        _local.traces = stack


@contextlib.contextmanager
def suspend_traces():
    """Nothing inside the block is counted by the active `fastenc.trace()` blocks (CUDA-graph warm-up passes)."""
    saved = _active_traces()
    _local.traces = []
    try:
        yield
    finally:
        _local.traces = saved


_open_traces = [0]  # trace() blocks open in any thread: while 0, `tracing()` is one list read


def tracing() -> bool:
    """True while a `fastenc.trace()` block is active in this thread (eager code only): hot paths test this before
    doing any trace bookkeeping."""
    return _open_traces[0] > 0 and not torch.compiler.is_compiling() and bool(getattr(_local, "traces", None))


def record(backend: str, op: str, n: int = 1) -> None:
    if torch.compiler.is_compiling():  # a compiled graph runs no Python: trace() counts eager calls only
        return
    for t in _active_traces():
        t.counts[f"{backend}.{op}"] += n

"""Backend choice, fall-back policy and the `fastenc.trace()` kernel counter.

Every public op in `fastenc.ops` calls `resolve_backend(...)` once per call and then `record(...)` with the backend
that actually ran. A fall-back (the requested backend cannot run the op) warns once per (op, reason) or raises
`BackendUnavailableError` when strict. Nothing here imports triton: the kernels are imported on first use, so
`TRITON_INTERPRET=1` may be set after `import fastenc`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch

from . import _cuda
from ._compat import compile_disabled
from .errors import BackendUnavailableError, InputError

BACKENDS = ("torch", "triton", "cuda")
_REQUESTABLE = ("auto", *BACKENDS)
ENV_BACKEND = "FASTENC_BACKEND"


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # a constant, so torch.compile traces it


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def cuda_extension_available() -> bool:
    """The csrc/ CUDA ops are loaded, or prebuilt (`fastenc._C`, from setup.py) and a CUDA device is visible. A JIT
    build (minutes, on first use) is only started by an explicit backend="cuda", never by "auto"."""
    if not torch.cuda.is_available():
        return False
    return _cuda.is_loaded() or _PREBUILT_CUDA


_PREBUILT_CUDA = importlib.util.find_spec("fastenc._C") is not None


def available_backends() -> list[str]:
    """Backends that can run at least one op on this machine, in order of preference (last is fastest)."""
    out = ["torch"]
    if triton_installed() and (torch.cuda.is_available() or triton_interpret()):
        out.append("triton")
    if cuda_extension_available():
        out.append("cuda")
    return out


def check_backend_name(backend: str | None, arg: str = "backend") -> str:
    if backend is None:
        return "auto"
    if not isinstance(backend, str) or backend not in _REQUESTABLE:
        raise InputError(f"{arg} must be one of {_REQUESTABLE}, got {backend!r}")
    return backend


def requested_backend(backend: str | None) -> str:
    """Apply the FASTENC_BACKEND override to "auto"; explicit names win over the env var."""
    backend = check_backend_name(backend)
    if backend == "auto":
        env = os.environ.get(ENV_BACKEND, "").strip().lower()
        if env:
            return check_backend_name(env, arg=f"${ENV_BACKEND}")
    return backend


def _triton_can_run(device: torch.device) -> str | None:
    """None if Triton kernels can run on tensors of `device`, else the reason they cannot."""
    if not triton_installed():
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpret():
        return None
    return f"triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got device {device}"


def resolve_backend(
    op: str,
    backend: str | None,
    device: torch.device,
    *,
    strict: bool = False,
    kernels: tuple[str, ...] = ("triton",),
    unsupported: dict[str, str | None] | None = None,
) -> str:
    """Pick the backend that runs `op` now.

    kernels: the non-torch backends that implement `op`, fastest last.
    unsupported: backend -> reason the current inputs cannot run on it (None = fine), from the op's shape checks.
    "auto" picks the fastest backend that can run; an explicit backend that cannot run falls back to the next
    slower one (cuda -> triton -> torch), with a warning, or raises when strict.
    """
    want = requested_backend(backend)
    unsupported = unsupported or {}

    def reason_for(name: str) -> str | None:
        if name == "torch":
            return None
        if name not in kernels:
            return f"fastenc has no {name} kernel for {op}"
        if name == "cuda":
            if want == "auto" and not cuda_extension_available():
                return "the fastenc CUDA extension is not built (see csrc/README.md)"
            why = _cuda.unavailable_reason()  # explicit backend="cuda": loads, or JIT-builds on first use
            if why:
                return why
        if name == "triton":
            why = _triton_can_run(device)
            if why:
                return why
        return unsupported.get(name)

    if want == "auto":
        for name in ("cuda", "triton"):
            if reason_for(name) is None and (name != "triton" or device.type == "cuda"):
                return name
        return "torch"
    why = reason_for(want)
    if why is None:
        return want
    if strict:
        raise BackendUnavailableError(f"{op}: backend {want!r} cannot run: {why} (strict=True forbids fall-back)")
    order = [b for b in ("cuda", "triton", "torch") if BACKENDS.index(b) < BACKENDS.index(want)]
    chosen = next(b for b in order if reason_for(b) is None)
    warn_fallback(op, want, chosen, why)
    return chosen


_kernel_modules: dict = {}


def kernel_module(name: str):
    """fastenc.kernels.<name>, imported on first use (importing triton must follow TRITON_INTERPRET). Later calls
    are a dict lookup, which torch.compile traces without a graph break."""
    mod = _kernel_modules.get(name)
    if mod is None:
        mod = _import_kernel_module(name)
    return mod


@compile_disabled
def _import_kernel_module(name: str):
    mod = _kernel_modules[name] = importlib.import_module(f"fastenc.kernels.{name}")
    return mod


def choose_backend(
    op: str, device: torch.device, backend: str | None, strict: bool, triton_reason, cuda_reason=None
) -> str:
    """One op call's backend: resolve_backend with the kernels' shape checks `triton_reason()` / `cuda_reason()`
    (str or None; cuda_reason only for ops with a CUDA kernel) run only where that backend is in play, and the
    choice recorded for fastenc.trace()."""
    want = requested_backend(backend)
    on_gpu_auto = want == "auto" and device.type == "cuda"
    unsupported: dict[str, str | None] = {}
    if (want in ("triton", "cuda") or on_gpu_auto) and _triton_can_run(device) is None:
        unsupported["triton"] = triton_reason()
    kernels: tuple[str, ...] = ("triton",)
    if cuda_reason is not None:
        kernels = ("triton", "cuda")
        if want == "cuda" or (on_gpu_auto and cuda_extension_available()):
            if device.type != "cuda":
                unsupported["cuda"] = f"the CUDA kernels need CUDA tensors, got device {device}"
            else:
                unsupported["cuda"] = cuda_reason()
    which = resolve_backend(op, want, device, strict=strict, kernels=kernels, unsupported=unsupported)
    record(which, op)
    return which


_warned: set[tuple[str, str, str]] = set()


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
    try:
        yield t
    finally:
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


def record(backend: str, op: str, n: int = 1) -> None:
    if torch.compiler.is_compiling():  # a compiled graph runs no Python: trace() counts eager calls only
        return
    for t in _active_traces():
        t.counts[f"{backend}.{op}"] += n

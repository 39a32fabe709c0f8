"""Backend choice: which backends exist here, what was asked for (with $FASTENC_BACKEND), which one runs an op.

Every public op in `fastenc.ops` calls `choose_backend(...)` once per call, which records the backend that ran (see
`fastenc.core.trace`, where `trace()`, `record()` and the one fall-back policy `fall_back()` live). A fall-back (the
requested backend cannot run the op) warns once per (op, reason) or raises `BackendUnavailableError` when strict.
Nothing here imports triton: the kernels are imported on first use, so
`TRITON_INTERPRET=1` may be set after `import fastenc`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from . import cuda as _cuda
from .errors import InputError
from .trace import fall_back, record

BACKENDS = ("torch", "triton", "cuda")
_REQUESTABLE = ("auto", *BACKENDS)
MODEL_BACKENDS = ("onnxruntime",)  # a whole model (fastenc.optimize; see fastenc/runtime/ort_backend.py), not one op
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


def check_backend_name(backend: str | None, arg: str = "backend", *, model_level: bool = False) -> str:
    """model_level: also accept the backends that run a whole model ("onnxruntime": fastenc.optimize only)."""
    if backend is None:
        return "auto"
    names = _REQUESTABLE + (MODEL_BACKENDS if model_level else ())
    if not isinstance(backend, str) or backend not in names:
        raise InputError(f"{arg} must be one of {names}, got {backend!r}")
    return backend


def requested_backend(backend: str | None) -> str:
    """Apply the FASTENC_BACKEND override to "auto"; explicit names win over the env var. For one op, a model-level
    value of the variable ("onnxruntime") means "auto": ops of a model ONNX Runtime cannot serve pick as usual."""
    backend = check_backend_name(backend)
    if backend == "auto":
        env = os.environ.get(ENV_BACKEND, "").strip().lower()
        if env:
            env = check_backend_name(env, arg=f"${ENV_BACKEND}", model_level=True)
            return "auto" if env in MODEL_BACKENDS else env
    return backend


def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def auto_model_backend() -> str | None:
    """The whole-model backend `fastenc.optimize(backend="auto")` picks, or None for the per-op choice:
    "onnxruntime" when $FASTENC_BACKEND says so, or, with the variable unset, on a CPU-only machine (no CUDA device,
    not under Triton's interpreter) where onnx and onnxruntime are installed."""
    env = os.environ.get(ENV_BACKEND, "").strip().lower()
    if env:
        return env if env in MODEL_BACKENDS else None
    if torch.cuda.is_available() or triton_interpret() or not onnxruntime_installed():
        return None
    return "onnxruntime"


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
    chosen, why = pick_backend(op, want, device, kernels, unsupported or {})
    if why is not None:
        fall_back(op, want, chosen, why, strict=strict)
    return chosen


def pick_backend(
    op: str, want: str, device: torch.device, kernels: tuple[str, ...], unsupported: dict[str, str | None]
) -> tuple[str, str | None]:
    """(the backend that runs `op`, why the requested one `want` (env already applied) cannot: None if it runs),
    recording and warning nothing: resolve_backend's rule, for callers that decide once and report per call."""

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
                return name, None
        return "torch", None
    why = reason_for(want)
    if why is None:
        return want, None
    order = [b for b in ("cuda", "triton", "torch") if BACKENDS.index(b) < BACKENDS.index(want)]
    return next(b for b in order if reason_for(b) is None), why


def choose_backend(
    op: str, device: torch.device, backend: str | None, strict: bool, triton_reason, cuda_reason=None
) -> str:
    """One op call's backend: resolve_backend with the kernels' shape checks `triton_reason()` / `cuda_reason()`
    (str or None; cuda_reason only for ops with a CUDA kernel) run only where that backend is in play, and the
    choice recorded for fastenc.trace()."""
    want = requested_backend(backend)
    which, why = op_backend(op, device, want, triton_reason, cuda_reason)
    if why is not None:
        fall_back(op, want, which, why, strict=strict)
    record(which, op)
    return which


def op_backend(op: str, device: torch.device, want: str, triton_reason, cuda_reason=None) -> tuple[str, str | None]:
    """choose_backend's decision for requested backend `want` (env already applied): (backend, fall-back reason or
    None), with nothing recorded. An op plan calls this once per op and input signature."""
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
    return pick_backend(op, want, device, kernels, unsupported)

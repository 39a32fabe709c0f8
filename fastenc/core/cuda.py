"""The CUDA backend's Python side: loads the csrc/ extension and mirrors the Triton launchers' API.

The launchers here (`cuda_<op>_forward`) have the signatures and semantics of the Triton launchers in
`fastenc.kernels.norm`, `.activation` and `.attention` and assert only what their kernel needs: inputs are checked
once, by the public ops. They call torch ops that csrc/bindings.cpp registers as `torch.ops.fastenc_cuda.*`; the
fake (meta) implementations that torch.compile / export / opcheck need are registered here once the extension is
loaded; their backward formulas are the op layer's (`fastenc.ops._library.load_cuda_ops`).

Loading (`extension()`, on first use only, never at `import fastenc`):
  1. the prebuilt `fastenc._C` (setup.py, when a CUDA torch and nvcc were present at install time);
  2. otherwise a JIT build of csrc/ with `torch.utils.cpp_extension.load` into a cache directory
     ($FASTENC_CUDA_CACHE, default ~/.cache/fastenc/cuda/<torch>-<cuda>-<hash of csrc/>), reused by later processes;
     architectures from TORCH_CUDA_ARCH_LIST, else the current device's. FASTENC_CUDA_JIT=0 disables it.
A failure is remembered: `unavailable_reason()` says why (with the build log's path), and nothing raises at import.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import threading
from pathlib import Path

import torch

from .compat import compile_disabled
from .errors import BackendUnavailableError, InputError

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh", "relu")
NORM_MAX_N = 16384  # FASTENC_NORM_MAX_N in csrc/fastenc_cuda.h: the fp32 row cache must fit shared memory
ATTN_MAX_SEQLEN_K = 128  # FASTENC_ATTN_MAX_SEQLEN_K: K and V of one (batch, head) live in shared memory
ATTN_MAX_HEAD_DIM = 128  # FASTENC_ATTN_MAX_HEAD_DIM
MAX_GRID_YZ = 65535  # the attention grid carries heads and batch on dims 1 and 2

ENV_JIT = "FASTENC_CUDA_JIT"
ENV_CACHE = "FASTENC_CUDA_CACHE"
CSRC = Path(__file__).resolve().parents[2] / "csrc"

_lock = threading.Lock()
_state: dict[str, object] = {}  # "loaded": str (how), or "reason": str


# ---------------------------------------------------------------------------------------------------- loading


def _sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp"))


def source_hash() -> str:
    """Hash of every file in csrc/ (sources and headers): a changed kernel gets a fresh JIT cache directory."""
    h = hashlib.sha256()
    for p in sorted(CSRC.iterdir()) if CSRC.is_dir() else []:
        if p.suffix in (".cu", ".cuh", ".cpp", ".h"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build_cache_dir() -> Path:
    """Where the JIT build lives; one directory per (torch, CUDA, csrc/ contents)."""
    root = Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "fastenc" / "cuda")
    tag = f"torch{torch.__version__.replace('+', '_')}-cu{torch.version.cuda}-{source_hash()}"
    return root / tag


def _have_op() -> bool:
    try:
        return hasattr(torch.ops.fastenc_cuda, "layer_norm")
    except (AttributeError, RuntimeError):
        return False


def _jit_build() -> str:
    from torch.utils import cpp_extension

    if not any(p.suffix == ".cu" for p in _sources()):
        raise _NoBuild(f"no csrc/ sources at {CSRC} to JIT-build (a wheel ships none: build fastenc._C instead)")
    if cpp_extension.CUDA_HOME is None:
        raise _NoBuild("nvcc / CUDA_HOME not found, so the JIT build of csrc/ cannot run (set CUDA_HOME)")
    build_dir = build_cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build_error.log"
    try:
        cpp_extension.load(
            name="fastenc_cuda_jit",
            sources=[str(p) for p in _sources()],
            extra_include_paths=[str(CSRC)],
            extra_cuda_cflags=["-O3", "-std=c++17"],
            extra_cflags=["-O3"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=os.environ.get("FASTENC_CUDA_VERBOSE", "0") == "1",
        )
    except Exception as e:  # noqa: BLE001 - any build failure becomes a reason, with the full text in the log
        log.write_text(f"{type(e).__name__}: {e}\n")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _NoBuild(f"the JIT build of csrc/ failed ({first}); full log: {log}") from e
    return f"JIT build in {build_dir}"


class _NoBuild(Exception):
    pass


def _load() -> str:
    """How the ops got loaded; raises _NoBuild with the reason they cannot be."""
    if not torch.version.cuda:
        raise _NoBuild(f"torch {torch.__version__} is a CPU-only build; the CUDA backend needs a CUDA build of torch")
    if not torch.cuda.is_available():
        raise _NoBuild("no CUDA device is visible (torch.cuda.is_available() is False)")
    if _have_op():
        return "already registered"
    try:
        importlib.import_module("fastenc._C")
        if _have_op():
            return "prebuilt fastenc._C"
    except ImportError:
        pass
    if os.environ.get(ENV_JIT, "1").strip().lower() in ("0", "false", "off", "no"):
        raise _NoBuild(f"fastenc._C is not built and {ENV_JIT}=0 disables the JIT build (see csrc/README.md)")
    how = _jit_build()
    if not _have_op():
        raise _NoBuild("the CUDA extension loaded but registered no torch.ops.fastenc_cuda ops")
    return how


def extension() -> str:
    """Load the CUDA ops (prebuilt, else JIT-built and cached) once per process; returns how they were loaded.
    Raises BackendUnavailableError with the reason when they cannot be."""
    with _lock:
        if "loaded" not in _state and "reason" not in _state:
            try:
                how = _load()
                _register_fakes()
                _state["loaded"] = how
            except _NoBuild as e:
                _state["reason"] = str(e)
    if "reason" in _state:
        raise BackendUnavailableError(f"fastenc CUDA backend unavailable: {_state['reason']}")
    return str(_state["loaded"])


def unavailable_reason() -> str | None:
    """None when the CUDA ops are loaded and usable, else why not. May build the extension (first call only)."""
    if "loaded" in _state:  # the per-call path: a dict lookup, which torch.compile traces without a break
        return None
    return _first_load_reason()


@compile_disabled
def _first_load_reason() -> str | None:
    try:
        extension()
    except BackendUnavailableError:
        return str(_state["reason"])
    return None


def is_loaded() -> bool:
    """The ops are loaded in this process (never triggers a build)."""
    return "loaded" in _state


# ---------------------------------------------------------------------------------------------------- fake impls


def _register_fakes() -> None:
    """Fake implementations (shapes, dtypes, strides of the outputs) for torch.compile, export and opcheck."""

    @torch.library.register_fake("fastenc_cuda::layer_norm")
    def _cuda_layer_norm_fake(x, weight, bias, residual, eps):
        return [x.new_empty(x.shape)] + ([x.new_empty(x.shape)] if residual is not None else [])

    @torch.library.register_fake("fastenc_cuda::rms_norm")
    def _cuda_rms_norm_fake(x, weight, residual, eps):
        y_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else x.dtype
        return [x.new_empty(x.shape, dtype=y_dtype)] + ([x.new_empty(x.shape)] if residual is not None else [])

    @torch.library.register_fake("fastenc_cuda::bias_activation")
    def _cuda_bias_activation_fake(x, bias, activation):
        return x.new_empty(x.shape)

    @torch.library.register_fake("fastenc_cuda::gated_activation")
    def _cuda_gated_activation_fake(gate, up, activation):
        return gate.new_empty(gate.shape)

    @torch.library.register_fake("fastenc_cuda::attention")
    def _cuda_attention_fake(q, k, v, key_padding_mask, bias, rel_bias_table, rel_bias_lut, causal, scale):
        b, h, sq, d = q.shape
        return q.new_empty((b, sq, h, d)).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------- helpers


def _cuda_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t (..., n) as a (rows, n) view with unit column stride; copies only when no such view exists."""
    if t.dim() == 0 or t.stride(-1) != 1:
        t = t.contiguous()
    if n == 0:  # reshape(-1, 0) is ambiguous: name the row count (the binding returns the empty output)
        return t.reshape(math.prod(t.shape[:-1]), 0)
    return t.reshape(-1, n)


def _device_reason(t: torch.Tensor) -> str | None:
    if t.device.type != "cuda":
        return f"the CUDA kernels need CUDA tensors, got device {t.device}"
    return unavailable_reason()


def _check_activation_name(activation: str) -> None:
    """The kernel switches on the name: an unknown one is a typed error, not a crash in the binding."""
    if activation not in ACTIVATIONS:
        raise InputError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


# ---------------------------------------------------------------------------------------------------- norm


def cuda_norm_unsupported_reason(x: torch.Tensor) -> str | None:
    """None if the CUDA norm kernels can run on x (..., N), else why not."""
    n = x.shape[-1] if x.dim() else 1
    if n > NORM_MAX_N:
        return f"hidden size {n} exceeds the {NORM_MAX_N} columns the CUDA norm kernel caches in shared memory"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} is not fp32/fp16/bf16"
    return _device_reason(x)


def _norm(op, x, weight, bias, eps, residual):
    extension()
    n = x.shape[-1]
    x2 = _cuda_rows(x, n)
    r2 = None if residual is None else _cuda_rows(residual, n)
    weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
        if bias.dtype != weight.dtype:  # the kernel reads w and b in one dtype; fp32 holds any of the three exactly
            weight, bias = weight.float(), bias.float()
    if op == "layer_norm":
        out = torch.ops.fastenc_cuda.layer_norm(x2, weight, bias, r2, float(eps))
    else:
        out = torch.ops.fastenc_cuda.rms_norm(x2, weight, r2, float(eps))
    return out[0].view(x.shape), (None if residual is None else out[1].view(x.shape))


def cuda_layer_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(LayerNorm(s), s) with s = x + residual rounded to x.dtype (s is None without residual). y in x.dtype.

    x, residual: (..., N), same dtype; weight, bias: (N,) in any float dtype (fp32 math)."""
    return _norm("layer_norm", x, weight, bias, eps, residual)


def cuda_rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(RMSNorm(s), s), T5LayerNorm semantics: y has x.dtype for an fp32 weight and weight.dtype for fp16/bf16
    (the normalised value is rounded to the weight's dtype before the multiply)."""
    return _norm("rms_norm", x, weight, None, eps, residual)


# ---------------------------------------------------------------------------------------------------- activation


def cuda_activation_unsupported_reason(x: torch.Tensor) -> str | None:
    """None if the CUDA activation kernels can run on x, else why not."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} is not fp32/fp16/bf16"
    return _device_reason(x)


def cuda_bias_activation_forward(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """act(x + bias) with fp32 math, output in x.dtype and x's shape. x: (..., N); bias: (N,) or None."""
    _check_activation_name(activation)
    extension()
    n = x.shape[-1] if x.dim() else 1
    x2 = _cuda_rows(x, n)
    if bias is not None:
        bias = bias.contiguous()
        if bias.dtype != x.dtype:  # the kernel reads the bias in x's dtype or fp32; fp32 holds any float exactly
            bias = bias.float()
    return torch.ops.fastenc_cuda.bias_activation(x2, bias, activation).view(x.shape)


def cuda_gated_activation_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up with fp32 math, output in gate's dtype and shape. gate, up: (..., N), same shape and dtype;
    each may be a strided view (e.g. the two halves of one (..., 2N) projection)."""
    _check_activation_name(activation)
    assert gate.shape == up.shape and gate.dtype == up.dtype, "gate and up: one shape and dtype (the op checks)"
    extension()
    n = gate.shape[-1] if gate.dim() else 1
    return torch.ops.fastenc_cuda.gated_activation(_cuda_rows(gate, n), _cuda_rows(up, n), activation).view(gate.shape)


# ---------------------------------------------------------------------------------------------------- attention


def cuda_attention_unsupported_reason(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    rel_bias_table: torch.Tensor | None = None,
) -> str | None:
    """None if the short-sequence CUDA kernel handles these inputs, else why not (the ops layer runs Triton)."""
    b, h, _, d = q.shape
    sk = k.shape[2]
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA attention kernel is fp16/bf16 only (tensor cores), got {q.dtype}"
    if bias is not None:
        return "the CUDA attention kernel takes no additive bias"
    if rel_bias_table is not None:
        return "the CUDA attention kernel takes no relative-position bias"
    if sk > ATTN_MAX_SEQLEN_K:
        return f"Sk {sk} > {ATTN_MAX_SEQLEN_K} (the CUDA kernel holds one head's K and V in shared memory)"
    if d == 0 or d > ATTN_MAX_HEAD_DIM:
        return f"head dim {d} is outside [1, {ATTN_MAX_HEAD_DIM}]"
    if b > MAX_GRID_YZ or h > MAX_GRID_YZ:
        return f"batch {b} or heads {h} > {MAX_GRID_YZ} (CUDA grid limit)"
    return _device_reason(q)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def cuda_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None = None,
    rel_bias_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(scale * q @ k^T, masked) @ v. q: (B, H, Sq, D), k, v: (B, H, Sk, D), any strides with unit D stride
    preferred. key_padding_mask: (B, Sk) bool, True = attend. causal (top-left, Sq == Sk). Returns (B, H, Sq, D) in
    q.dtype, a view of a (B, Sq, H, D)-contiguous buffer; fully masked rows are 0.

    Inputs `cuda_attention_unsupported_reason` refuses (bias, rel bias, fp32, Sk > 128, D > 128) raise
    BackendUnavailableError: the ops layer checks first and runs Triton for them."""
    why = cuda_attention_unsupported_reason(q, k, v, bias, rel_bias_table)
    if why is not None:
        raise BackendUnavailableError(f"CUDA attention cannot run these inputs: {why}")
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.bool)
    return torch.ops.fastenc_cuda.attention(q, k, v, mask, None, None, None, bool(causal), float(scale))

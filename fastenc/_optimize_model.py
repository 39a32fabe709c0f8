"""The model half of `fastenc.optimize`: one transformers encoder -> its fused twin over the same weights.

`fastenc.optimize` (fastenc/optimize.py) is the public entry: it sends a diffusers pipeline to fastenc/pipelines.py,
which calls `optimize_model` for each encoder component, and every other model straight here."""

from __future__ import annotations

import torch

from .core.dispatch import auto_model_backend, check_backend_name
from .core.errors import InputError, UnsupportedModelError
from .core.trace import fall_back
from .graphs import GraphConfig, GraphRunner, graph_config, graphed_class
from .models import FUSED_CLASSES, check_model_config
from .models._base import ExecutionState, prefuse, shallow_copy_as
from .models._encoder import FastencModelMixin

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supported_models() -> list[str]:
    return sorted(cls.__name__ for cls in FUSED_CLASSES)


def optimize_model(
    model: torch.nn.Module,
    backend: str = "auto",
    strict: bool = False,
    *,
    cuda_graphs: bool | GraphConfig = False,
    quantize: str | None = None,
    threads: int | None = None,
) -> torch.nn.Module:
    """`fastenc.optimize` for one transformers encoder (see its docstring): checks the options, picks the fused
    class (CUDA-graphed or ONNX Runtime-backed when asked for) and returns it over `model`'s weights."""
    backend = check_backend_name(backend, model_level=True)
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
    graphs = graph_config(cuda_graphs)
    explicit_ort = backend == "onnxruntime"
    if quantize is not None and not explicit_ort:
        raise InputError(f"quantize={quantize!r} applies to backend='onnxruntime', got backend={backend!r}")
    if explicit_ort and graphs is not None:
        raise InputError("cuda_graphs applies to the CUDA backends, not backend='onnxruntime'")
    if quantize is not None:
        from .export.quantize import QUANTIZE_MODES

        if quantize not in QUANTIZE_MODES:
            raise InputError(f"quantize must be None or one of {QUANTIZE_MODES}, got {quantize!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads must be None or an int >= 1, got {threads!r}")
    if isinstance(model, FastencModelMixin):  # re-optimize: new settings, same weights
        base = model._fastenc_base
    else:
        base = type(model)
    fused = FUSED_CLASSES.get(base)
    if fused is None:
        raise UnsupportedModelError(
            f"fastenc.optimize does not support {base.__module__}.{base.__name__}; supported: "
            f"{', '.join(supported_models())}"
        )
    dtypes = {p.dtype for p in model.parameters()}
    if not dtypes <= set(_DTYPES):
        raise UnsupportedModelError(f"model parameters must be fp32/fp16/bf16, got {sorted(map(str, dtypes))}")
    check_model_config(model)
    use_ort = explicit_ort or (backend == "auto" and graphs is None and auto_model_backend() == "onnxruntime"
                               and _ort_by_default(model, base))  # fmt: skip
    if use_ort:
        from .export.towers import _classes

        if base not in _classes():
            fall_back(
                f"optimize({base.__name__})",
                "onnxruntime",
                "torch",
                f"fastenc.export has no ONNX export for {base.__name__}",
                strict=strict and explicit_ort,
            )
            use_ort = False
    cls = fused if graphs is None else graphed_class(fused, base)
    if use_ort:
        from .runtime.ort_backend import ort_class

        cls = ort_class(fused, base)
    new = shallow_copy_as(model, cls)
    new.__dict__.pop("_fastenc_graphs", None)  # re-optimizing a graphed model: never share its graphs
    new.__dict__.pop("_fastenc_ort", None)  # nor its ONNX Runtime session
    if use_ort:
        from .runtime.ort_backend import OrtState

        new._fastenc_ort = OrtState(explicit=explicit_ort, strict=strict, quantize=quantize, threads=threads)
        backend = "torch"  # the calls ONNX Runtime does not serve run the fused torch path
    new._fastenc = rt = ExecutionState(backend=backend, strict=strict)
    prefuse(rt, model)  # q/k/v (and T5's wi_0/wi_1) become row blocks of one buffer, shared with `model`
    new._fastenc_base = base
    if graphs is not None:
        new._fastenc_graphs = GraphRunner(graphs)
    return new


def _ort_by_default(model: torch.nn.Module, base: type) -> bool:
    """ "auto" exports to ONNX only fp32 models whose weights fit one ONNX file (no multi-GB trace on first call)."""
    from .export.onnx_export import LARGE_BYTES
    from .export.towers import _classes

    params = list(model.parameters())
    if base not in _classes() or any(p.dtype != torch.float32 for p in params):
        return False
    return sum(p.numel() for p in params) * 4 <= LARGE_BYTES

"""fastenc.optimize: swap a transformers encoder (or a diffusers pipeline's encoders) for its fused twin, sharing
every weight. The model half lives in fastenc/_optimize_model.py, the pipeline half in fastenc/pipelines.py.

This module imports no torch at its top: `import fastenc` binds `fastenc.optimize` to the function below (shadowing
this module's name) without loading torch, transformers or the fused towers; the first call loads them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .core.errors import InputError

if TYPE_CHECKING:
    import torch

    from .graphs import GraphConfig


def optimize(
    model: torch.nn.Module,
    backend: str = "auto",
    strict: bool = False,
    *,
    cuda_graphs: bool | GraphConfig = False,
    prompt_cache=None,
    quantize: str | None = None,
    threads: int | None = None,
) -> torch.nn.Module:
    """Return a model with the same forward signature and ModelOutput fields whose towers run fastenc's fused ops.

    The result is a new module object that shares parameters and buffers with `model` (no weight is copied;
    `model` itself is left as it was). backend: "auto" | "torch" | "triton" | "cuda"; the FASTENC_BACKEND env var
    overrides "auto". strict=True raises BackendUnavailableError where an op would fall back to a slower backend.
    Use `fastenc.trace()` to see which backend ran each op.

    cuda_graphs: True (or a `fastenc.graphs.GraphConfig`) captures each input shape's forward (and CLIPModel's /
    SiglipModel's get_text_features / get_image_features) into a CUDA graph and replays it: batches pad up to
    buckets, outputs are fresh tensors unless GraphConfig(outputs="static"). Calls a graph cannot serve (CPU
    tensors, autograd, training, output_attentions) run eagerly with a FallbackWarning. See fastenc/graphs.py.

    A diffusers `DiffusionPipeline` is optimized in place and returned (every supported encoder component swapped,
    denoiser untouched; `prompt_cache=True` or a `fastenc.PromptCache` caches encoder outputs per prompt): see
    fastenc/pipelines.py.

    backend="onnxruntime" (CPU): the forward runs the model's ONNX export through ONNX Runtime (exported on the first
    call it can serve, into a cache keyed by the weights' content and the export options: $FASTENC_CACHE or
    ~/.cache/fastenc); calls the graph does not compute (autograd, training, output_attentions / hidden states, CUDA
    tensors, arguments the graph lacks, non-fp32 weights) run the fused torch path, recorded as a fall-back. It is
    what "auto" picks on a CPU-only machine (no CUDA, not under TRITON_INTERPRET=1) with onnxruntime installed, for
    models whose fp32 weights fit one ONNX file (< 1.8 GB). quantize="int8-dynamic" exports int8 linear layers (see
    fastenc.export.quantize); threads: ONNX Runtime's intra-op threads (default torch.get_num_threads()). See
    fastenc/runtime/ort_backend.py.
    """
    from .pipelines import is_pipeline  # diffusers itself is never imported here

    if is_pipeline(model):
        from .pipelines import optimize_pipeline

        return optimize_pipeline(model, backend, strict, cuda_graphs=cuda_graphs, prompt_cache=prompt_cache)
    if prompt_cache is not None:
        raise InputError("prompt_cache applies to diffusers pipelines; for one encoder use fastenc.PromptCache.attach")
    from ._optimize_model import optimize_model

    return optimize_model(model, backend, strict, cuda_graphs=cuda_graphs, quantize=quantize, threads=threads)


def __getattr__(name: str):
    if name == "supported_models":  # `from fastenc.optimize import supported_models`: the fused model classes
        from ._optimize_model import supported_models

        return supported_models
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

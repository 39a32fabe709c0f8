"""fastenc.optimize: swap a transformers encoder for its fused twin, sharing every weight."""

from __future__ import annotations

import torch

from ._dispatch import check_backend_name
from .errors import InputError, UnsupportedModelError
from .graphs import GraphConfig, GraphRunner, graph_config, graphed_class
from .models import FUSED_CLASSES, check_config
from .models._base import Runtime, prefuse, shallow_copy_as
from .models._encoder import FastencModelMixin

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supported_models() -> list[str]:
    return sorted(cls.__name__ for cls in FUSED_CLASSES)


def optimize(
    model: torch.nn.Module,
    backend: str = "auto",
    strict: bool = False,
    *,
    cuda_graphs: bool | GraphConfig = False,
    prompt_cache=None,
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
    """
    from .pipelines import is_pipeline  # diffusers itself is never imported here

    if is_pipeline(model):
        from .pipelines import optimize_pipeline

        return optimize_pipeline(model, backend, strict, cuda_graphs=cuda_graphs, prompt_cache=prompt_cache)
    if prompt_cache is not None:
        raise InputError("prompt_cache applies to diffusers pipelines; for one encoder use fastenc.PromptCache.attach")
    backend = check_backend_name(backend)
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
    graphs = graph_config(cuda_graphs)
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
    check_config(model)
    new = shallow_copy_as(model, fused if graphs is None else graphed_class(fused, base))
    new.__dict__.pop("_fastenc_graphs", None)  # re-optimizing a graphed model: never share its graphs
    new._fastenc = rt = Runtime(backend=backend, strict=strict)
    prefuse(rt, model)  # q/k/v (and T5's wi_0/wi_1) become row blocks of one buffer, shared with `model`
    new._fastenc_base = base
    if graphs is not None:
        new._fastenc_graphs = GraphRunner(graphs)
    return new

"""fastenc: fused Triton/CUDA kernels for CLIP, SigLIP and T5 encoder towers, drop-in for transformers.

model = fastenc.optimize(hf_model)            # same forward signature and ModelOutput fields
with fastenc.trace() as t:                    # which backend ran which op
    model(**inputs)
print(t.counts)                               # {"triton.attention": 12, ...}
"""

import importlib as _importlib

from . import distributed, integrations, ops
from ._version import __version__  # noqa: F401 - fastenc.__version__
from .core.dispatch import available_backends
from .core.errors import BackendUnavailableError, DoubleBackwardError, FastencError, InputError, UnsupportedModelError
from .core.trace import FallbackWarning, trace
from .integrations import register_transformers_attention
from .optimize import optimize  # noqa: E402  (the function shadows its module's name, as intended)

register_transformers_attention()  # attn_implementation="fastenc"; warns, never raises, without AttentionInterface

# public subpackages, imported on first attribute access: `import fastenc` stays light (no onnx / onnxruntime, no
# tokenizers or PIL for diagnostics) and `fastenc.export.to_onnx(...)` works without a separate import
_SUBPACKAGES = ("diagnostics", "distributed", "embed", "export", "models", "ops", "pipelines", "runtime", "train")
_LAZY = {"PromptCache": "pipelines"}  # name -> submodule holding it


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        module = _importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    if name in _LAZY:
        value = getattr(_importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBPACKAGES) | set(_LAZY))


__all__ = [
    "BackendUnavailableError",
    "DoubleBackwardError",
    "FallbackWarning",
    "FastencError",
    "InputError",
    "PromptCache",
    "UnsupportedModelError",
    "available_backends",
    "diagnostics",
    "distributed",
    "export",
    "integrations",
    "models",
    "ops",
    "optimize",
    "pipelines",
    "register_transformers_attention",
    "trace",
]

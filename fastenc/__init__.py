"""fastenc: fused Triton/CUDA kernels for CLIP, SigLIP and T5 encoder towers, drop-in for transformers.

model = fastenc.optimize(hf_model)            # same forward signature and ModelOutput fields
with fastenc.trace() as t:                    # which backend ran which op
    model(**inputs)
print(t.counts)                               # {"triton.attention": 12, ...}

`import fastenc` imports neither torch nor transformers: every public name and subpackage below is loaded on first
use (module `__getattr__`), so `fastenc --help` answers without them. attn_implementation="fastenc" is registered
in transformers as soon as transformers' modeling code is imported (see fastenc.integrations).
"""

import importlib as _importlib

from . import integrations
from ._version import __version__  # noqa: F401 - fastenc.__version__
from .core.errors import BackendUnavailableError, DoubleBackwardError, FastencError, InputError, UnsupportedModelError
from .optimize import optimize  # the function shadows its module's name, as intended; optimize.py imports no torch

integrations.register_when_transformers_loads()  # attn_implementation="fastenc"; warns, never raises

# public subpackages, imported on first attribute access: `fastenc.export.to_onnx(...)` works without a separate
# import, and `import fastenc` stays light (no torch, no onnx / onnxruntime, no tokenizers or PIL for diagnostics)
_SUBPACKAGES = ("diagnostics", "distributed", "embed", "export", "models", "ops", "pipelines", "runtime", "train")
_LAZY = {  # public name -> the module defining it
    "FallbackWarning": ".core.trace",
    "PromptCache": ".pipelines",
    "available_backends": ".core.dispatch",
    "register_transformers_attention": ".integrations.transformers_attention",
    "trace": ".core.trace",
}


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        value = _importlib.import_module(f".{name}", __name__)
    elif name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name], __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


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

"""fastenc: fused Triton/CUDA kernels for CLIP, SigLIP and T5 encoder towers, drop-in for transformers.

    model = fastenc.optimize(hf_model)            # same forward signature and ModelOutput fields
    with fastenc.trace() as t:                    # which backend ran which op
        model(**inputs)
    print(t.counts)                               # {"triton.attention": 12, ...}
"""

from . import ops
from ._dispatch import FallbackWarning, available_backends, trace
from .errors import BackendUnavailableError, FastencError, InputError, UnsupportedModelError

__version__ = "0.1.0"


def optimize(model, backend: str = "auto", strict: bool = False, **kwargs):
    """Return `model` with its encoder towers replaced by fastenc's fused implementations (see fastenc.optimize)."""
    from .optimize import optimize as _optimize

    return _optimize(model, backend=backend, strict=strict, **kwargs)


__all__ = [
    "BackendUnavailableError",
    "FallbackWarning",
    "FastencError",
    "InputError",
    "UnsupportedModelError",
    "available_backends",
    "ops",
    "optimize",
    "trace",
]

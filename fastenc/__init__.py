"""fastenc: fused Triton/CUDA kernels for CLIP, SigLIP and T5 encoder towers, drop-in for transformers.

model = fastenc.optimize(hf_model)            # same forward signature and ModelOutput fields
with fastenc.trace() as t:                    # which backend ran which op
    model(**inputs)
print(t.counts)                               # {"triton.attention": 12, ...}
"""

from . import distributed, integrations, ops
from ._dispatch import FallbackWarning, available_backends, trace
from .errors import BackendUnavailableError, FastencError, InputError, UnsupportedModelError
from .integrations import register_transformers_attention
from .optimize import optimize  # noqa: E402  (the function shadows its module's name, as intended)

register_transformers_attention()  # attn_implementation="fastenc"; warns, never raises, without AttentionInterface

__version__ = "0.1.0"


__all__ = [
    "BackendUnavailableError",
    "FallbackWarning",
    "FastencError",
    "InputError",
    "UnsupportedModelError",
    "available_backends",
    "distributed",
    "integrations",
    "ops",
    "optimize",
    "register_transformers_attention",
    "trace",
]

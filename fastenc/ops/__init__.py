"""The op layer: one file per op (`attention`, `norm`, `activation`, `cosine`, `contrastive`) holding everything of
that op above the kernel: the public function with its input checks, the torch backend, the launcher glue to
`kernels/<op>.py`, the fake and the backward registration; `_library` the torch.library machinery they share,
`_plan` the ops resolved once per model, `reference` the fp32 definitions.
Every op takes keyword-only `backend=` ("auto" | "torch" | "triton" | "cuda") and `strict=`."""

from . import _library
from .activation import bias_activation, gated_activation
from .attention import attention
from .contrastive import clip_loss, siglip_loss
from .cosine import cosine_similarity_matrix, topk_cosine
from .norm import layer_norm, rms_norm
from .reference import ACTIVATIONS, HF_ACTIVATIONS

_library._seal()  # every op file has declared its torch.library ops

__all__ = [
    "ACTIVATIONS",
    "HF_ACTIVATIONS",
    "attention",
    "bias_activation",
    "clip_loss",
    "cosine_similarity_matrix",
    "gated_activation",
    "layer_norm",
    "rms_norm",
    "siglip_loss",
    "topk_cosine",
]

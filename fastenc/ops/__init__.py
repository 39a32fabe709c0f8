"""The op layer: one public function per op, backend choice, input checks; each op's plain-torch reference is
also its CPU path. Every op takes keyword-only `backend=` ("auto" | "torch" | "triton" | "cuda") and `strict=`."""

from .activation import ACTIVATIONS, HF_ACTIVATIONS, bias_activation, gated_activation
from .attention import attention
from .contrastive import clip_loss, siglip_loss
from .cosine import cosine_similarity_matrix, topk_cosine
from .norm import layer_norm, rms_norm

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

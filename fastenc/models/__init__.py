"""Fused tower implementations: each takes the weights of a transformers model and returns its output objects."""

from ._encoder import check_config
from .clip import FUSED_CLASSES as _CLIP

FUSED_CLASSES: dict[type, type] = {**_CLIP}

__all__ = ["FUSED_CLASSES", "check_config"]

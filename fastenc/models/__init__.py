"""Fused tower implementations: each takes the weights of a transformers model and returns its output objects."""

from ._encoder import check_config as _check_encoder_config
from .clip import FUSED_CLASSES as _CLIP
from .siglip import FUSED_CLASSES as _SIGLIP
from .t5 import FUSED_CLASSES as _T5

FUSED_CLASSES: dict[type, type] = {**_CLIP, **_SIGLIP, **_T5}


def check_config(model) -> None:
    """Raise UnsupportedModelError for configs the fused class of `model` does not reproduce: the fused class's own
    `fastenc_check_config` where it has one (T5, UMT5), else the CLIP/SigLIP encoder check."""
    fused = FUSED_CLASSES.get(getattr(model, "_fastenc_base", type(model)))
    getattr(fused, "fastenc_check_config", _check_encoder_config)(model)


__all__ = ["FUSED_CLASSES", "check_config"]

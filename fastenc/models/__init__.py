"""Fused tower implementations: each takes the weights of a transformers model and returns its output objects."""


def __getattr__(name: str):
    """FUSED_CLASSES (transformers class -> fused class) on first use: the towers import torch and transformers'
    model code, which `fastenc.models.configs` (named shapes, read by the CLI's parsers) does not need."""
    if name != "FUSED_CLASSES":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .clip import FUSED_CLASSES as clip
    from .siglip import FUSED_CLASSES as siglip
    from .t5 import FUSED_CLASSES as t5

    value = globals()["FUSED_CLASSES"] = {**clip, **siglip, **t5}
    return value


def check_model_config(model) -> None:
    """Raise UnsupportedModelError for configs the fused class of `model` does not reproduce: the fused class's own
    `fastenc_check_config` where it has one (T5, UMT5: `t5.check_t5_config`), else `check_encoder_config` (CLIP,
    SigLIP)."""
    from . import FUSED_CLASSES
    from ._encoder import check_encoder_config

    fused = FUSED_CLASSES.get(getattr(model, "_fastenc_base", type(model)))
    getattr(fused, "fastenc_check_config", check_encoder_config)(model)


__all__ = ["FUSED_CLASSES", "check_model_config"]

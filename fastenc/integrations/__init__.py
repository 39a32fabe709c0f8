"""Integrations of fastenc ops with other libraries' extension points.

transformers: `register_transformers_attention()` registers fastenc attention under attn_implementation="fastenc",
so `AutoModel.from_config(cfg, attn_implementation="fastenc")` runs `fastenc.ops.attention` in models fastenc does
not fully replace. See `transformers_attention` for the mask handling and every fall-back.
"""

from .transformers_attention import (
    ATTN_IMPLEMENTATION,
    fastenc_attention_forward,
    register_transformers_attention,
    transformers_attention_settings,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "fastenc_attention_forward",
    "register_transformers_attention",
    "transformers_attention_settings",
]

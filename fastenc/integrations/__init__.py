"""Integrations of fastenc ops with other libraries' extension points.

transformers: `register_transformers_attention()` registers fastenc attention under attn_implementation="fastenc",
so `AutoModel.from_config(cfg, attn_implementation="fastenc")` runs `fastenc.ops.attention` in models fastenc does
not fully replace. See `transformers_attention` for the mask handling and every fall-back.

When it is registered without being asked: `import fastenc` calls `register_when_transformers_loads()`, which
registers at once when transformers' modeling code (`transformers.modeling_utils`, where AttentionInterface lives)
is already imported, and otherwise the moment it is imported (a one-shot `sys.meta_path` hook, removed when it
fires). So `import fastenc` imports neither torch nor transformers, and every model class transformers builds
afterwards (any `from_pretrained` / `from_config`) already knows "fastenc". The registration uses the settings of
the last `register_transformers_attention(...)` call (backend="auto", strict=False until then).

This package's names load on first use: `import fastenc.integrations` imports no torch.
"""

import importlib as _importlib
import warnings as _warnings

from .import_hook import run_after_import

_TRANSFORMERS_ATTENTION = (  # names of .transformers_attention, loaded on first access
    "ATTN_IMPLEMENTATION",
    "fastenc_attention_forward",
    "register_transformers_attention",
    "transformers_attention_settings",
)
MODELING_MODULE = "transformers.modeling_utils"  # its import is what makes attn_implementation="fastenc" reachable


def register_when_transformers_loads() -> None:
    """Register attn_implementation="fastenc" now if transformers' modeling code is imported, else when it is."""
    run_after_import(MODELING_MODULE, _register_with_current_settings)


def _register_with_current_settings() -> None:
    try:
        from .transformers_attention import register_transformers_attention, transformers_attention_settings

        register_transformers_attention(**transformers_attention_settings())
    except Exception as e:  # never break the import of transformers that triggered this
        _warnings.warn(
            f"fastenc: attn_implementation='fastenc' was not registered ({type(e).__name__}: {e}); "
            "call fastenc.integrations.register_transformers_attention() to see why",
            RuntimeWarning,
            stacklevel=2,
        )


def __getattr__(name: str):
    if name not in _TRANSFORMERS_ATTENTION:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(".transformers_attention", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_TRANSFORMERS_ATTENTION))


__all__ = [
    "ATTN_IMPLEMENTATION",
    "fastenc_attention_forward",
    "register_transformers_attention",
    "register_when_transformers_loads",
    "transformers_attention_settings",
]

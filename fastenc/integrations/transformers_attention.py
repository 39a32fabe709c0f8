"""fastenc attention behind transformers' own extension point: attn_implementation="fastenc".

    import fastenc.integrations
    fastenc.integrations.register_transformers_attention()        # idempotent; backend="auto", strict=False
    model = AutoModel.from_config(cfg, attn_implementation="fastenc")
    with fastenc.trace() as t:
        model(**inputs)                                              # t.counts["triton.attention"] == layers

`fastenc_attention_forward` has transformers' attention-interface signature and runs `fastenc.ops.attention`.

Masks. "fastenc" is registered in transformers' AttentionMaskInterface with transformers' own `sdpa_mask`, so a model
builds exactly the mask it builds for "sdpa": None where `is_causal` or plain bidirectional attention suffices, else a
(B, 1, Sq, Sk) bool tensor, True = attend. That mask is converted once per forward (the analysis is cached on the
mask tensor, which every layer shares) into the cheapest fastenc form:
    None                              -> causal flag (module.is_causal / is_causal kwarg, Sq > 1, as sdpa) or nothing
    bool, == key_padding[b, j]        -> key_padding_mask (B, Sk)                     (encoders with padding)
    bool, == tril & key_padding[b, j] -> causal=True + key_padding_mask (B, Sq == Sk)  (decoders with padding)
    anything else (sliding window, packed sequences, chunked prefill against a cache, custom masks, float masks)
                                      -> additive bias: 0 / -inf from a bool mask, a float mask as given
Detecting the structure reads the mask (one device sync per forward); under torch.jit tracing or torch.compile the
structure is not read and the bias form is used, so no data-dependent branch is traced.

Fully masked query rows (every key masked, e.g. left-padding positions of a padded causal batch) give 0, as
transformers' sdpa does on torch >= 2.5; transformers' eager gives the mean of v over all keys there instead. Rows
of a float (finfo.min) mask that mask every key give that mean in fastenc too, as they do in eager and sdpa.

GQA / MQA: k and v are expanded to the query heads with a copy (num_key_value_groups x the k/v memory, the same
copy transformers' repeat_kv makes for sdpa with a mask); fastenc's kernel has no grouped-head indexing yet.

Fall-backs. Anything that changes the math and fastenc cannot do runs transformers' own code instead, recorded in
`fastenc.trace()` (counts["transformers_eager.attention"] / ["transformers_sdpa.attention"] and a Fallback entry)
with a FallbackWarning, or raises BackendUnavailableError when strict:
    output_attentions=True (needs the weights), softcap, s_aux / sinks, unrecognised arguments -> the model's eager
    dropout > 0 (training), a paged cache, causal with Sq > Sk, sliding_window with no mask    -> transformers' sdpa
sliding_window with a mask is honoured: transformers puts the window into the mask, as it does for sdpa.
position_bias (T5, MPNet, ...) is honoured as an additive bias.
"""

from __future__ import annotations

import sys
import threading
import warnings
import weakref

import torch

from ..core.dispatch import check_backend_name, requested_backend
from ..core.errors import BackendUnavailableError, InputError
from ..core.trace import fall_back, record
from ..ops.attention import attention

ATTN_IMPLEMENTATION = "fastenc"

# backend / strict used by the registered function; set by register_transformers_attention
_settings = {"backend": "auto", "strict": False}

# Arguments transformers passes down that do not change the math once the mask is built: positions are already in
# q/k (rotary) and in the mask (packed sequences), cu_seq_lens / max_length only index flash-attention's varlen
# kernels, the rest is bookkeeping. sliding_window is handled in the function (it is in the mask).
_NEUTRAL_KWARGS = frozenset(
    {
        "position_ids",
        "cache_position",
        "past_key_values",
        "past_key_value",
        "use_cache",
        "output_hidden_states",
        "return_dict",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "layer_idx",
        "token_type_ids",
        "deterministic",
        "encoder_hidden_states",  # cross-attention: already projected into key / value
        "output_attentions",  # False here; True is a fall-back
        "sliding_window",
    }
)
_EAGER_KWARGS = ("softcap", "s_aux", "sinks")  # change the math; the model's eager function implements them


def transformers_attention_settings() -> dict:
    """{"backend": ..., "strict": ...} used by attn_implementation="fastenc" (a copy)."""
    return dict(_settings)


def register_transformers_attention(backend: str = "auto", strict: bool = False) -> bool:
    """Register fastenc attention as attn_implementation="fastenc" in transformers (idempotent).

    backend: "auto" | "torch" | "triton" | "cuda" for every registered attention call ("auto" honours
    $FASTENC_BACKEND); strict: raise BackendUnavailableError instead of falling back (to a slower fastenc backend
    or to transformers' own attention). Calling it again only updates these two settings.
    Returns False, with a RuntimeWarning, where this transformers has no AttentionInterface (never raises for that).
    """
    backend = check_backend_name(backend)
    if not isinstance(strict, bool):
        raise InputError(f"strict must be a bool, got {strict!r}")
    _settings.update(backend=backend, strict=strict)
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except Exception as e:  # ImportError / AttributeError on a transformers without the interfaces
        warnings.warn(
            f"fastenc: attn_implementation={ATTN_IMPLEMENTATION!r} is not available: this transformers has no "
            f"AttentionInterface / AttentionMaskInterface ({type(e).__name__}: {e})",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    AttentionInterface.register(ATTN_IMPLEMENTATION, fastenc_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return True


# ---------------------------------------------------------------------------------------------------------------
# mask analysis


class _MaskInfo:
    """What one 4D mask means in fastenc terms. kind: "padding" | "causal" | "bias"."""

    __slots__ = ("kind", "kpm", "keep", "additive", "_bias")

    def __init__(self, kind, kpm, keep=None, additive=None):
        self.kind = kind
        self.kpm = kpm  # (B', Sk) bool or None
        self.keep = keep  # bool mask (bias kind, from a bool mask)
        self.additive = additive  # float mask as given (bias kind, from a float mask)
        self._bias = {}

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        if self.additive is not None:
            return self.additive
        if dtype not in self._bias:
            zero = torch.zeros((), dtype=dtype, device=self.keep.device)
            self._bias[dtype] = torch.where(self.keep, zero, float("-inf"))
        return self._bias[dtype]


_cache = threading.local()  # .entry = (weakref to the mask, mask._version, sq, sk, _MaskInfo): the last mask seen


def _analyse(mask: torch.Tensor, sq: int, sk: int) -> _MaskInfo:
    """_MaskInfo of `mask`, computed once for the layers of one forward (they share the mask tensor)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return _analyse_uncached(mask, sq, sk, tracing=True)
    entry = getattr(_cache, "entry", None)
    if entry is not None and entry[0]() is mask and entry[1:4] == (mask._version, sq, sk):
        return entry[4]
    info = _analyse_uncached(mask, sq, sk, tracing=False)
    _cache.entry = (weakref.ref(mask), mask._version, sq, sk, info)
    return info


def _analyse_uncached(mask: torch.Tensor, sq: int, sk: int, tracing: bool) -> _MaskInfo:
    if mask.ndim != 4:
        raise InputError(f"attention_mask must be 4D (B, 1 or H, Sq, Sk), got shape {tuple(mask.shape)}")
    if mask.shape[-1] < sk or mask.shape[-2] not in (1, sq):
        raise InputError(f"attention_mask of shape {tuple(mask.shape)} does not cover (Sq={sq}, Sk={sk})")
    mask = mask[..., :sk]  # masks sized for a static cache are longer than the keys (eager slices the same way)
    if mask.dtype == torch.bool:
        keep = mask
    elif mask.dtype.is_floating_point:
        keep = mask != float("-inf")
    else:
        raise InputError(f"attention_mask must be bool (True = attend) or additive float, got {mask.dtype}")
    # keys no query attends: a valid key_padding_mask for any mask; it also makes fully masked rows give 0
    kpm = keep.any(dim=2).any(dim=1)  # (B', Sk)
    if mask.dtype == torch.bool and mask.shape[1] == 1 and not tracing:
        rows = mask[:, 0]  # (B', Sq', Sk)
        if bool((rows == kpm[:, None, :]).all()):
            return _MaskInfo("padding", None if bool(kpm.all()) else kpm)
        if rows.shape[1] == sq == sk:
            tril = torch.ones(sq, sk, dtype=torch.bool, device=mask.device).tril()
            if bool((rows == (tril & kpm[:, None, :])).all()):
                return _MaskInfo("causal", None if bool(kpm.all()) else kpm)
    if mask.dtype == torch.bool:
        return _MaskInfo("bias", kpm, keep=keep)
    return _MaskInfo("bias", kpm, additive=mask)


# ---------------------------------------------------------------------------------------------------------------
# fall-backs


def _fall_back(target: str, why: str, module, query, key, value, attention_mask, dropout, scaling, is_causal, kw):
    """Run transformers' own `target` ("eager" | "sdpa") attention, visibly."""
    ran = f"transformers_{target}"
    want = requested_backend(_settings["backend"])
    if _settings["strict"]:  # before anything runs
        fall_back("attention", want, ran, f"(attn_implementation={ATTN_IMPLEMENTATION!r}) {why}", strict=True)
    if target == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise BackendUnavailableError(
                f"attention (attn_implementation={ATTN_IMPLEMENTATION!r}): {why}, and {type(module).__module__} "
                "has no eager_attention_forward to fall back to; use attn_implementation='eager'"
            )
        # eager functions add the mask and never apply is_causal: give them the full additive mask
        attention_mask = _eager_mask(attention_mask, query, key, is_causal)
        fall_back("attention", want, ran, why)
        record(ran, "attention")
        return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    fall_back("attention", want, ran, why)
    record(ran, "attention")
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kw
    )


def _eager_mask(mask, query, key, is_causal):
    """The additive float mask eager attention expects (transformers' eager_mask: 0 / finfo.min)."""
    sq, sk = query.shape[2], key.shape[2]
    if mask is None:
        if not (is_causal and sq > 1):
            return None
        mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril()[None, None]  # sdpa's top-left
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=query.dtype, device=mask.device)
        mask = torch.where(mask, zero, torch.finfo(query.dtype).min)
    return mask


# ---------------------------------------------------------------------------------------------------------------
# the attention function


def fastenc_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query (B, H, Sq, D), key / value (B, Hkv, Sk, D), attention_mask None or
    4D (bool True = attend, or additive float) -> (attn_output (B, Sq, H, D), None).

    Runs fastenc.ops.attention with the backend / strict of `register_transformers_attention`; see the module
    docstring for the mask conversion and the fall-backs to transformers' eager / sdpa attention."""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    sq, sk = query.shape[2], key.shape[2]
    position_bias = kwargs.get("position_bias")
    args = (module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)

    # 1. what fastenc cannot compute: transformers' own attention runs instead, visibly
    if kwargs.get("output_attentions"):
        return _fall_back("eager", "output_attentions=True needs the attention weights", *args)
    for name in _EAGER_KWARGS:
        if kwargs.get(name) is not None:
            return _fall_back("eager", f"{name} is not supported by fastenc attention", *args)
    if kwargs.get("cache") is not None:
        return _fall_back("sdpa", "a paged KV cache (continuous batching)", *args)
    known = _NEUTRAL_KWARGS | {"position_bias", "cache"}
    unknown = sorted(n for n, v in kwargs.items() if n not in known and v is not None and v is not False)
    if unknown:
        return _fall_back("eager", f"unrecognised attention argument(s) {unknown}", *args)
    if dropout:
        return _fall_back("sdpa", "dropout > 0 (fastenc attention has no dropout)", *args)
    causal = attention_mask is None and bool(is_causal) and sq > 1  # sdpa's rule
    if causal and sk < sq:
        return _fall_back("sdpa", "causal attention with more queries than keys", *args)
    window = kwargs.get("sliding_window")
    if attention_mask is None and window is not None and sk > window:
        return _fall_back("sdpa", "sliding_window without a materialised mask", *args)

    # 2. GQA / MQA: one k/v head per group of query heads -> expand (a copy, as transformers' repeat_kv)
    b, h = query.shape[:2]
    hkv = key.shape[1]
    if hkv != h:
        if hkv == 0 or h % hkv or value.shape[1] != hkv:
            raise InputError(
                f"query heads ({h}) must be a multiple of key/value heads (key {tuple(key.shape)}, "
                f"value {tuple(value.shape)})"
            )
        key = key.repeat_interleave(h // hkv, dim=1)
        value = value.repeat_interleave(h // hkv, dim=1)

    # 3. the mask in fastenc's form
    kpm = bias = None
    if attention_mask is None:
        if causal and sk > sq:  # sdpa: prefill of an empty static cache; the later keys are not yet written
            key, value = key[:, :, :sq], value[:, :, :sq]
            if position_bias is not None:
                position_bias = position_bias[..., :sq]
            sk = sq
        bias = position_bias
    else:
        info = _analyse(attention_mask, sq, sk)
        kpm = info.kpm
        if kpm is not None and kpm.shape[0] != b:
            kpm = kpm.expand(b, sk)
        if info.kind == "causal":
            causal = True
            bias = position_bias
        elif info.kind == "padding":
            bias = position_bias
        elif position_bias is None:
            bias = info.bias(query.dtype)
        elif info.additive is not None:
            bias = position_bias + info.additive[..., :sk]
        else:
            bias = torch.where(info.keep, position_bias, float("-inf"))

    out = attention(
        query,
        key,
        value,
        causal=causal,
        key_padding_mask=kpm,
        bias=bias,
        scale=scaling,
        backend=_settings["backend"],
        strict=_settings["strict"],
    )  # (B, H, Sq, D); the Triton output is (B, Sq, H, D)-contiguous underneath
    return out.transpose(1, 2).contiguous(), None

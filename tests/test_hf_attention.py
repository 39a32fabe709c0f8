"""attn_implementation="fastenc": fastenc attention inside transformers models fastenc does not fully replace.

Tiny random-weight models (no downloads) run with attn_implementation="fastenc" and are compared with the same
weights under "eager" and "sdpa"; fastenc.trace() must show fastenc attention ran in every attention call, and every
fall-back must show up in the trace, warn, and raise when strict.
"""

from __future__ import annotations

import copy
import sys
import types
import warnings

import pytest
import torch
import transformers
from transformers import AutoModel
from utils import FP32, assert_close

import fastenc
import fastenc.integrations as fi
from fastenc.core import trace as _trace
from fastenc.integrations import transformers_attention as ta

fi.register_transformers_attention()  # idempotent; fastenc/__init__ will call it at import


@pytest.fixture(autouse=True)
def _settings(monkeypatch):
    """Each test starts from backend="auto", strict=False and leaves them so; fall-back warnings are not yet spent
    (FallbackWarning fires once per (op, backend, reason) per process)."""
    monkeypatch.setattr(_trace, "_warned", set())
    fi.register_transformers_attention()
    yield
    fi.register_transformers_attention()


def _use(backend, strict=False):
    assert fi.register_transformers_attention(backend=backend, strict=strict)


TINY = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def _config(kind):
    """(config, number of attention calls per forward)."""
    if kind == "bert":
        return transformers.BertConfig(**TINY, max_position_embeddings=32), 2
    if kind == "vit":
        cfg = dict(TINY, image_size=8, patch_size=4, num_channels=3)
        cfg.pop("vocab_size")
        return transformers.ViTConfig(**cfg), 2
    if kind.startswith("llama"):  # GQA: 4 query heads, 2 key/value heads
        return transformers.LlamaConfig(**TINY, num_key_value_heads=2), 2
    if kind == "qwen2":  # MQA
        return transformers.Qwen2Config(**TINY, num_key_value_heads=1), 2
    if kind == "clip_text":
        return transformers.CLIPTextConfig(**TINY, max_position_embeddings=32, bos_token_id=0, eos_token_id=2), 2
    if kind == "mistral_sw":  # sliding window 3 < sequence 7: the window lives in the mask (fastenc bias path)
        return transformers.MistralConfig(**TINY, num_key_value_heads=2, sliding_window=3), 2
    if kind.startswith("gemma2"):  # sliding + full layers, scaling = query_pre_attn_scalar ** -0.5 != D ** -0.5
        softcap = 50.0 if kind == "gemma2_softcap" else None
        cfg = transformers.Gemma2Config(
            **TINY, num_key_value_heads=2, head_dim=8, sliding_window=3, query_pre_attn_scalar=16,
            attn_logit_softcapping=softcap,
        )  # fmt: skip
        return cfg, 2
    if kind == "t5":  # relative position_bias, decoder causal self-attention and cross-attention
        cfg = transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, num_layers=2, num_heads=4, d_ff=37)
        return cfg, 6
    raise AssertionError(kind)


def _inputs(kind, b=2, s=7):
    """Model inputs with padding in row 1 (left padding for "llama_left"); the (B, S) mask of valid tokens."""
    if kind == "vit":
        return {"pixel_values": torch.randn(b, 3, 8, 8)}, None
    ids = torch.randint(3, 50, (b, s))
    am = torch.ones(b, s, dtype=torch.long)
    if kind == "llama_left":
        am[1, :3] = 0
    else:
        am[1, s - 3 :] = 0
    inputs = {"input_ids": ids, "attention_mask": am}
    if kind == "t5":  # last_hidden_state is the decoder's: 5 tokens, all valid
        inputs["decoder_input_ids"] = torch.randint(3, 50, (b, 5))
        return inputs, None
    return inputs, am.bool()


def _models(kind):
    """The same random weights under eager, sdpa (where the model supports it) and fastenc (built with
    from_config)."""
    cfg, calls = _config(kind)
    impls = ("eager", "fastenc") if kind.startswith("gemma2") else ("eager", "sdpa", "fastenc")  # no sdpa: softcap
    models = {}
    for impl in impls:
        torch.manual_seed(0)
        # a config of its own: from_config writes attn_implementation into the config it is given
        models[impl] = AutoModel.from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
    for impl in impls[1:]:
        models[impl].load_state_dict(models["eager"].state_dict())
    for impl, model in models.items():
        assert model.config._attn_implementation == impl
    return models, calls


# the form each model's masks take in fastenc (see transformers_attention's docstring); None: no mask at all
MASK_FORMS = {
    "bert": {"padding"},
    "vit": set(),
    "llama_right": {"causal"},
    "llama_left": {"causal"},
    "qwen2": {"causal"},
    "clip_text": {"causal"},
    "mistral_sw": {"bias"},
    "gemma2": {"bias", "causal"},  # sliding-window layer, full layer
    "t5": {"padding"},  # encoder self- and decoder cross-attention; decoder self-attention: no mask, causal flag
}


def _check_parity(kind, backend, monkeypatch):
    models, calls = _models(kind)
    inputs, valid = _inputs(kind)
    forms = set()
    analyse = ta._analyse_uncached

    def spy(*args, **kw):
        info = analyse(*args, **kw)
        forms.add(info.kind)
        return info

    monkeypatch.setattr(ta, "_analyse_uncached", spy)
    with torch.no_grad():
        with fastenc.trace() as t_ref:
            ref = {impl: models[impl](**inputs).last_hidden_state for impl in models if impl != "fastenc"}
        assert not t_ref.counts and not t_ref.fallbacks, dict(t_ref.counts)  # the references ran no fastenc code
        with fastenc.trace() as t:
            got = models["fastenc"](**inputs).last_hidden_state
    assert t.counts[f"{backend}.attention"] == calls, dict(t.counts)
    assert sum(t.counts.values()) == calls and not t.fallbacks, (dict(t.counts), t.fallbacks)
    assert forms == MASK_FORMS[kind]
    # eager gives fully masked query rows (left padding of a causal model, padding inside a sliding window) the
    # mean of v, fastenc and sdpa give 0: compare with eager on valid tokens only, with sdpa everywhere
    rows = slice(None) if valid is None else valid
    assert_close(got[rows], ref["eager"][rows], **FP32, name=f"{kind} vs eager")
    if "sdpa" in ref:
        assert_close(got, ref["sdpa"], **FP32, name=f"{kind} vs sdpa")


TORCH_KINDS = ["bert", "vit", "llama_right", "llama_left", "qwen2", "clip_text", "mistral_sw", "gemma2", "t5"]
TRITON_KINDS = ["bert", "llama_left", "clip_text", "mistral_sw", "t5"]  # the interpreter is slow: one per mask form


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_parity_torch_backend(kind, monkeypatch):
    _use("torch", strict=True)
    _check_parity(kind, "torch", monkeypatch)


@pytest.mark.parametrize("kind", TRITON_KINDS)
def test_parity_triton_backend(kind, monkeypatch):
    if "triton" not in fastenc.available_backends():
        pytest.skip("triton cannot run here")
    _use("triton", strict=True)
    _check_parity(kind, "triton", monkeypatch)


def test_registration_is_idempotent_and_validated():
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    assert fi.register_transformers_attention() and fi.register_transformers_attention()
    assert transformers.AttentionInterface()["fastenc"] is fi.fastenc_attention_forward
    assert AttentionMaskInterface()["fastenc"] is sdpa_mask
    assert "fastenc" in transformers.AttentionInterface().valid_keys()
    _use("triton", strict=True)
    assert fi.transformers_attention_settings() == {"backend": "triton", "strict": True}
    with pytest.raises(fastenc.InputError, match="backend"):
        fi.register_transformers_attention(backend="flash")
    with pytest.raises(fastenc.InputError, match="strict"):
        fi.register_transformers_attention(strict="yes")


def test_registration_degrades_to_a_warning_without_attention_interface(monkeypatch):
    with monkeypatch.context() as m, pytest.warns(RuntimeWarning, match="AttentionInterface"):
        m.setitem(sys.modules, "transformers", types.ModuleType("transformers"))  # a transformers without it
        assert fi.register_transformers_attention(backend="torch") is False
    assert fi.transformers_attention_settings()["backend"] == "torch"  # the settings still apply


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("FASTENC_BACKEND", "torch")
    models, calls = _models("bert")
    inputs, _ = _inputs("bert")
    with torch.no_grad(), fastenc.trace() as t:
        models["fastenc"](**inputs)
    assert t.counts["torch.attention"] == calls, dict(t.counts)


def test_save_pretrained_round_trip_and_set_attn_implementation(tmp_path):
    models, calls = _models("llama_right")
    inputs, _ = _inputs("llama_right")
    models["eager"].save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, attn_implementation="fastenc").eval()
    assert loaded.config._attn_implementation == "fastenc"
    switched = models["eager"]
    switched.set_attn_implementation("fastenc")
    assert switched.config._attn_implementation == "fastenc"
    with torch.no_grad():
        ref = models["sdpa"](**inputs).last_hidden_state
        for model in (loaded, switched):
            with fastenc.trace() as t:
                got = model(**inputs).last_hidden_state
            assert t.counts["torch.attention"] == calls, dict(t.counts)
            assert_close(got, ref, **FP32, name="reloaded / switched model")


# ---------------------------------------------------------------------------------------------------------------
# fall-backs: visible in the trace, warned, raising when strict


def _fallback_run(model, inputs, ran, calls, **kw):
    with warnings.catch_warnings(record=True) as caught, fastenc.trace() as t:
        warnings.simplefilter("always")
        out = model(**inputs, **kw)
    assert t.counts[f"{ran}.attention"] == calls, dict(t.counts)
    assert sum(t.counts.values()) == calls, dict(t.counts)
    assert len(t.fallbacks) == calls and all(f.ran == ran for f in t.fallbacks), t.fallbacks
    assert any(issubclass(w.category, fastenc.FallbackWarning) for w in caught), [str(w.message) for w in caught]
    return out, t


def test_dropout_in_training_falls_back_to_sdpa():
    cfg, calls = _config("bert")
    cfg.attention_probs_dropout_prob = 0.5
    models = {}
    for impl in ("sdpa", "fastenc"):
        torch.manual_seed(0)
        models[impl] = AutoModel.from_config(copy.deepcopy(cfg), attn_implementation=impl).train()
    inputs, _ = _inputs("bert")
    torch.manual_seed(1)
    ref = models["sdpa"](**inputs).last_hidden_state
    torch.manual_seed(1)
    got, t = _fallback_run(models["fastenc"], inputs, "transformers_sdpa", calls)
    assert "dropout" in t.fallbacks[0].reason
    assert_close(got.last_hidden_state, ref, atol=0, rtol=0, name="dropout fall-back vs sdpa, same seed")
    _use("auto", strict=True)
    with pytest.raises(fastenc.BackendUnavailableError, match="dropout"):
        models["fastenc"](**inputs)
    models["fastenc"].eval()  # no dropout in eval: fastenc runs, strict or not
    with torch.no_grad(), fastenc.trace() as t:
        models["fastenc"](**inputs)
    assert t.counts["torch.attention"] == calls and not t.fallbacks


@pytest.mark.parametrize("padded", [True, False])
def test_output_attentions_falls_back_to_eager(padded):
    models, calls = _models("clip_text")
    inputs, _ = _inputs("clip_text")
    if not padded:  # no mask reaches attention: the causal mask eager needs is built in the fall-back
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    with torch.no_grad():
        ref = models["eager"](**inputs, output_attentions=True)
        got, t = _fallback_run(models["fastenc"], inputs, "transformers_eager", calls, output_attentions=True)
    assert "output_attentions" in t.fallbacks[0].reason
    assert len(got.attentions) == calls
    for i, (a, r) in enumerate(zip(got.attentions, ref.attentions, strict=True)):
        assert_close(a, r, **FP32, name=f"attentions[{i}]")
    assert_close(got.last_hidden_state, ref.last_hidden_state, **FP32, name="last_hidden_state")
    _use("auto", strict=True)
    with torch.no_grad(), pytest.raises(fastenc.BackendUnavailableError, match="output_attentions"):
        models["fastenc"](**inputs, output_attentions=True)


def test_softcap_falls_back_to_eager():
    models, calls = _models("gemma2_softcap")
    inputs, _ = _inputs("gemma2_softcap")
    with torch.no_grad():
        ref = models["eager"](**inputs).last_hidden_state
        got, t = _fallback_run(models["fastenc"], inputs, "transformers_eager", calls)
    assert "softcap" in t.fallbacks[0].reason
    assert_close(got.last_hidden_state, ref, **FP32, name="softcap fall-back vs eager")
    _use("torch", strict=True)
    with torch.no_grad(), pytest.raises(fastenc.BackendUnavailableError, match="softcap"):
        models["fastenc"](**inputs)


# an attention module of a transformers model file: the eager fall-back uses that file's eager_attention_forward
_Attn = type(
    "_Attn",
    (torch.nn.Module,),
    {"is_causal": True, "num_key_value_groups": 2, "__module__": "transformers.models.llama.modeling_llama"},
)


def _qkv(b=2, h=4, hkv=2, sq=6, sk=6, d=8):
    return torch.randn(b, h, sq, d), torch.randn(b, hkv, sk, d), torch.randn(b, hkv, sk, d)


@pytest.mark.parametrize(
    "kw, ran, reason",
    [
        ({"sliding_window": 2}, "transformers_sdpa", "sliding_window"),  # no mask to carry the window
        ({"s_aux": torch.zeros(4)}, "transformers_eager", "s_aux"),
        ({"some_new_argument": torch.ones(3)}, "transformers_eager", "some_new_argument"),
        ({"some_new_argument": 1.5, "position_ids": torch.arange(6)}, "transformers_eager", "some_new_argument"),
    ],
)
def test_direct_call_fallbacks(kw, ran, reason):
    q, k, v = _qkv()
    module = _Attn()
    with warnings.catch_warnings(record=True) as caught, fastenc.trace() as t:
        warnings.simplefilter("always")
        out = fi.fastenc_attention_forward(module, q, k, v, None, scaling=0.3, **kw)[0]
    assert t.counts[f"{ran}.attention"] == 1 and len(t.fallbacks) == 1, (dict(t.counts), t.fallbacks)
    assert any(issubclass(w.category, fastenc.FallbackWarning) for w in caught)
    assert out.shape == (2, 6, 4, 8)
    assert reason in t.fallbacks[0].reason
    _use("auto", strict=True)
    with pytest.raises(fastenc.BackendUnavailableError, match=reason):
        fi.fastenc_attention_forward(module, q, k, v, None, scaling=0.3, **kw)


# ---------------------------------------------------------------------------------------------------------------
# the mask conversion, called directly against transformers' sdpa function


def _sdpa(module, q, k, v, mask, **kw):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, q, k, v, mask, **kw)[0]


@pytest.mark.parametrize("form", ["none_causal", "padding", "causal_padding", "random_bool", "float", "prefill_crop"])
def test_mask_forms_match_sdpa(form):
    _use("torch", strict=True)
    module = _Attn()
    sq = 6
    sk = 9 if form == "prefill_crop" else 6
    q, k, v = _qkv(sq=sq, sk=sk)
    kpm = torch.ones(2, sk, dtype=torch.bool)
    kpm[1, :2] = False
    tril = torch.ones(sq, sk, dtype=torch.bool).tril()
    mask = {
        "none_causal": None,
        "prefill_crop": None,
        "padding": kpm[:, None, None, :].expand(2, 1, sq, sk),
        "causal_padding": (tril & kpm[:, None, :])[:, None],
        "random_bool": torch.rand(2, 1, sq, sk) > 0.4,
        "float": torch.randn(2, 1, sq, sk),
    }[form]
    if form == "random_bool":
        mask[0, 0, 1] = False  # one fully masked row: 0 in both
    expect_kind = {"padding": "padding", "causal_padding": "causal", "random_bool": "bias", "float": "bias"}
    if mask is not None:
        assert ta._analyse(mask, sq, sk).kind == expect_kind[form]
        assert ta._analyse(mask, sq, sk) is ta._analyse(mask, sq, sk)  # cached across layers
    with fastenc.trace() as t:
        got = fi.fastenc_attention_forward(module, q, k, v, mask, scaling=0.25)[0]
    assert t.counts["torch.attention"] == 1 and not t.fallbacks
    ref = _sdpa(module, q, k, v, mask, scaling=0.25)
    assert got.shape == (2, sq, 4, 8)
    assert_close(got, ref, **FP32, name=form)


def test_mask_cache_follows_in_place_edits():
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    first = ta._analyse(mask, 5, 5)
    assert first.kind == "padding" and first.kpm is None
    mask[1, 0, :, 3:] = False  # bumps mask._version
    second = ta._analyse(mask, 5, 5)
    assert second is not first and second.kind == "padding"
    assert second.kpm.tolist() == [[True] * 5, [True, True, True, False, False]]


def test_bad_inputs_raise_typed_errors():
    module = _Attn()
    q, k, v = _qkv(h=4, hkv=3)
    with pytest.raises(fastenc.InputError, match="multiple"):
        fi.fastenc_attention_forward(module, q, k, v, None)
    q, k, v = _qkv()
    with pytest.raises(fastenc.InputError, match="attention_mask"):
        fi.fastenc_attention_forward(module, q, k, v, torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(fastenc.InputError, match="attention_mask"):
        fi.fastenc_attention_forward(module, q, k, v, torch.ones(2, 1, 6, 6, dtype=torch.long))


def test_generate_with_kv_cache_matches_sdpa():
    """Greedy decoding of a left-padded batch: prefill (causal + padding), then one query against the cache
    (Sq = 1 < Sk, padding mask (B, 1, 1, Sk)) per step."""
    cfg, layers = _config("llama_left")
    models = {}
    for impl in ("sdpa", "fastenc"):
        torch.manual_seed(0)
        models[impl] = transformers.LlamaForCausalLM(copy.deepcopy(cfg)).eval()
        models[impl].set_attn_implementation(impl)
    models["fastenc"].load_state_dict(models["sdpa"].state_dict())
    inputs, _ = _inputs("llama_left")
    kw = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    with torch.no_grad():
        ref = models["sdpa"].generate(**inputs, **kw)
        with fastenc.trace() as t:
            got = models["fastenc"].generate(**inputs, **kw)
    assert t.counts["torch.attention"] == 3 * layers and not t.fallbacks, dict(t.counts)
    assert torch.equal(got.sequences, ref.sequences)
    for i, (a, r) in enumerate(zip(got.logits, ref.logits, strict=True)):
        assert_close(a, r, **FP32, name=f"logits of step {i}")

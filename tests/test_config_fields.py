"""Every forward-relevant config field, edited on a tiny random model before `optimize`: the fused towers compute
what the transformers model's own forward computes with the edited config (which, for the fields transformers reads
while building its modules, is what the modules say), and say so when the config and the modules disagree
(`ConfigMismatchWarning`). Activations with no fused kernel run as their module (a recorded fall-back; strict raises).
See fastenc/models/_config.py for the audit of which field is read where."""

import warnings

import pytest
import torch
from transformers import (
    CLIPModel,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModel,
    SiglipModel,
    SiglipVisionModel,
)

import fastenc
from fastenc.models._config import ConfigMismatchWarning
from tests import test_clip, test_siglip, test_t5
from tests.utils import FP32, compare_outputs


def optimize_warns(model, field, **kw):
    """optimize(model) must warn ConfigMismatchWarning naming `field` (None: must not warn)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fast = fastenc.optimize(model, **kw)
    msgs = [str(w.message) for w in seen if issubclass(w.category, ConfigMismatchWarning)]
    if field is None:
        assert not msgs, msgs
    else:
        assert msgs and all(field in m for m in msgs), (field, msgs)
    return fast


def parity(model, fast, inputs, *, trace=True, fmt=FP32, **kw):
    """transformers' own forward vs the fused one; trace=False runs the untraced fast loop."""
    with torch.no_grad():
        ref = model(**inputs, **kw)
        if trace:
            with fastenc.trace() as t:
                got = fast(**inputs, **kw)
        else:
            got, t = fast(**inputs, **kw), None
    compare_outputs(ref, got, fmt)
    return t


def clip(cls=CLIPTextModel, **kw):
    return test_clip.build(cls, test_clip.make_config(**kw))


def clip_inputs(model, batch=3, seq=9):
    return test_clip.inputs_for(model, batch, seq=seq)


# ------------------------------------------------------------------------------------------- CLIP / SigLIP


@pytest.mark.parametrize("trace", [True, False], ids=["traced", "fast-loop"])
@pytest.mark.parametrize("cls", [CLIPTextModel, CLIPVisionModel, CLIPModel], ids=lambda c: c.__name__)
def test_clip_hidden_act_edited_after_build_follows_the_modules(cls, trace):
    """transformers built QuickGELU modules; config.hidden_act='gelu' afterwards changes nothing in its forward."""
    model = clip(cls)
    c = model.config
    for config in (c, getattr(c, "text_config", None), getattr(c, "vision_config", None)):
        if config is not None:
            config.hidden_act = "gelu"
    fast = optimize_warns(model, "hidden_act", backend="torch")
    parity(model, fast, clip_inputs(model), trace=trace)


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "quick_gelu"])
def test_clip_hidden_act_in_the_config_at_build_is_honoured(act):
    model = clip(act=act)
    fast = optimize_warns(model, None, backend="torch", strict=True)
    t = parity(model, fast, clip_inputs(model))
    assert t.counts["torch.bias_activation"] == 2 and "torch.module" not in t.counts
    parity(model, fast, clip_inputs(model), trace=False)


def test_clip_activation_without_a_kernel_runs_as_its_module():
    """hidden_act='silu' (no fused kernel): the fused linear, then transformers' SiLU module; on triton a fall-back
    record, under strict=True a BackendUnavailableError naming the activation."""
    model = clip(act="silu")
    fast = optimize_warns(model, None, backend="torch")
    t = parity(model, fast, clip_inputs(model))
    assert t.counts["torch.module"] == 2 and not t.fallbacks
    parity(model, fast, clip_inputs(model), trace=False)
    tri = fastenc.optimize(model, backend="triton")
    with pytest.warns(fastenc.FallbackWarning, match="activation"):
        t = parity(model, tri, clip_inputs(model))
    assert {f.op for f in t.fallbacks} == {"activation"} and t.counts["triton.attention"] == 2
    strict = fastenc.optimize(model, backend="triton", strict=True)
    with pytest.raises(fastenc.BackendUnavailableError, match="SiLU"):
        strict(**clip_inputs(model))


def test_clip_activation_module_replaced_after_optimize_is_followed():
    model = clip()
    fast = fastenc.optimize(model, backend="torch")
    parity(model, fast, clip_inputs(model), trace=False)  # the fast loop caches its layer weights
    for layer in model.encoder.layers:
        layer.mlp.activation_fn = torch.nn.GELU(approximate="tanh")
    parity(model, fast, clip_inputs(model), trace=False)
    parity(model, fast, clip_inputs(model))
    model.encoder.layers[0].mlp.activation_fn = torch.nn.SiLU()  # mixed: layer 0 runs its module
    parity(model, fast, clip_inputs(model), trace=False)
    t = parity(model, fast, clip_inputs(model))
    assert t.counts["torch.module"] == 1


def test_clip_layer_norm_eps():
    model = clip(CLIPModel)
    model.config.text_config.layer_norm_eps = 0.5  # after build: the norms keep their eps
    fast = optimize_warns(model, "layer_norm_eps", backend="torch")
    parity(model, fast, clip_inputs(model))
    for m in model.modules():  # the modules' own eps is what transformers computes with
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 0.25
    parity(model, fast, clip_inputs(model))
    parity(model, fast, clip_inputs(model), trace=False)


@pytest.mark.parametrize("cls", [CLIPTextModel, CLIPTextModelWithProjection, CLIPModel], ids=lambda c: c.__name__)
def test_clip_eos_token_id_pooling_rule(cls):
    """The pooling rule reads the model's own eos_token_id (set at build), as transformers' forward does: a config
    edited to the legacy id 2 afterwards changes nothing; a model built with eos_token_id=2 takes the highest id."""
    model = clip(cls, eos=50)
    text_config = getattr(model.config, "text_config", model.config)
    text_config.eos_token_id = 2
    fast = optimize_warns(model, "eos_token_id", backend="torch")
    inputs = clip_inputs(model, seq=9)
    ids = torch.randint(3, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    ids[:, 3], ids[:, 6] = 50, test_clip.VOCAB - 1  # eos before a higher id: the two rules pool different tokens
    inputs["input_ids"] = ids
    parity(model, fast, inputs)
    legacy = clip(cls, eos=2)
    parity(legacy, optimize_warns(legacy, None, backend="torch"), inputs)


def test_clip_num_attention_heads_edited_after_build():
    model = clip()
    model.config.num_attention_heads = 4  # the attention modules keep 2 heads of 32
    fast = optimize_warns(model, "num_attention_heads", backend="torch")
    parity(model, fast, clip_inputs(model))
    parity(model, fast, clip_inputs(model), trace=False)


def test_clip_attention_dropout_is_the_modules():
    """config.attention_dropout=0.5 after build: transformers' attention keeps dropout 0.0, so a training-mode
    forward is deterministic and the fused one must equal it (not drop out at 0.5)."""
    model = clip()
    model.config.attention_dropout = 0.5
    fast = optimize_warns(model, "attention_dropout", backend="torch")
    model.train()
    fast.train()
    parity(model, fast, clip_inputs(model))


def test_siglip_hidden_act_edited_after_build_follows_the_modules():
    """The vision tower's MAP head has its own MLP: it follows its module too."""
    model = test_siglip.build(SiglipModel, test_siglip.make_config())
    for config in (model.config.text_config, model.config.vision_config):
        config.hidden_act = "quick_gelu"  # built: gelu_pytorch_tanh
    fast = optimize_warns(model, "hidden_act", backend="torch")
    inputs = test_siglip.inputs_for(SiglipModel)
    parity(model, fast, inputs)
    parity(model, fast, inputs, trace=False)


def test_siglip_head_activation_without_a_kernel():
    model = test_siglip.build(SiglipVisionModel, test_siglip.make_config())
    model.head.mlp.activation_fn = torch.nn.SiLU()
    fast = fastenc.optimize(model, backend="torch")
    t = parity(model, fast, test_siglip.inputs_for(SiglipVisionModel))
    assert t.counts["torch.module"] == 1


@pytest.mark.parametrize("use_head", [True, False])
def test_siglip_vision_use_head_is_the_models(use_head):
    model = test_siglip.build(SiglipVisionModel, test_siglip.make_config(use_head=use_head))
    model.config.vision_use_head = not use_head
    fast = optimize_warns(model, "vision_use_head", backend="torch")
    parity(model, fast, test_siglip.inputs_for(SiglipVisionModel))


# ------------------------------------------------------------------------------------------------------ T5


def t5(**kw):
    return test_t5.build(test_t5.make_config(**kw))


T5_INPUTS = test_t5.inputs_for(3, 11)


@pytest.mark.parametrize("trace", [True, False], ids=["traced", "fast-loop"])
@pytest.mark.parametrize("ff", ["gated-gelu", "relu"])
def test_t5_dense_act_fn_edited_after_build_follows_the_modules(ff, trace):
    model = t5(ff=ff)
    model.config.dense_act_fn = "quick_gelu"
    model.config.feed_forward_proj = "gated-relu" if ff == "relu" else "relu"
    model.config.is_gated_act = not model.config.is_gated_act
    fast = optimize_warns(model, "dense_act_fn", backend="torch")
    parity(model, fast, T5_INPUTS, trace=trace)


@pytest.mark.parametrize("ff", ["gated-silu", "silu"])
def test_t5_activation_without_a_kernel_runs_as_its_module(ff):
    model = t5(ff=ff)
    fast = optimize_warns(model, None, backend="torch")
    t = parity(model, fast, T5_INPUTS)
    assert t.counts["torch.module"] == 2
    parity(model, fast, T5_INPUTS, trace=False)
    strict = fastenc.optimize(model, backend="triton", strict=True)
    with pytest.raises(fastenc.BackendUnavailableError, match="SiLU"):
        strict(**T5_INPUTS)


@pytest.mark.parametrize("trace", [True, False], ids=["traced", "fast-loop"])
def test_t5_relative_attention_buckets_are_the_modules(trace):
    model = t5(num_buckets=8, max_distance=16)
    model.config.relative_attention_num_buckets = 32
    model.config.relative_attention_max_distance = 128
    fast = optimize_warns(model, "relative_attention_num_buckets", backend="torch")
    parity(model, fast, test_t5.inputs_for(3, 40), trace=trace)


def test_t5_heads_dims_and_eps_edited_after_build():
    model = t5()
    model.config.num_heads = 4
    model.config.d_kv = 8
    model.config.layer_norm_epsilon = 0.5
    fast = optimize_warns(model, "num_heads", backend="torch")
    parity(model, fast, T5_INPUTS)
    for m in model.modules():  # T5LayerNorm's own epsilon
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = 0.25
    parity(model, fast, T5_INPUTS)
    parity(model, fast, T5_INPUTS, trace=False)


def test_t5_is_decoder_set_after_optimize_runs_transformers():
    """transformers' T5Stack reads config.is_decoder per call (a causal mask): the fused encoder does not compute
    that, so the call runs transformers' forward, recorded; strict=True refuses."""
    model = t5()
    fast = fastenc.optimize(model, backend="torch")
    strict = fastenc.optimize(model, backend="torch", strict=True)
    model.config.is_decoder = True  # shared by the optimized objects (config is copied by reference)
    with pytest.warns(fastenc.FallbackWarning, match="is_decoder"):
        t = parity(model, fast, T5_INPUTS)
    assert [f.op for f in t.fallbacks] == ["t5_encoder"]
    with pytest.raises(fastenc.BackendUnavailableError, match="is_decoder"):
        strict(**T5_INPUTS)
    with pytest.raises(fastenc.UnsupportedModelError, match="is_decoder"):
        fastenc.optimize(model)


def test_t5_dropout_is_the_modules():
    """config.dropout_rate=0 after build: the dropout modules keep p=0.1, so transformers' training-mode forward
    drops out; the fused model must run it (same RNG stream: equal outputs), not skip the dropout."""
    model = t5()
    model.config.dropout_rate = 0.0
    fast = optimize_warns(model, "dropout_rate", backend="torch")
    model.train()
    fast.train()
    torch.manual_seed(5)
    ref = model(**T5_INPUTS).last_hidden_state
    torch.manual_seed(5)
    got = fast(**T5_INPUTS).last_hidden_state
    assert torch.equal(ref, got)

"""The torch backend's hot path for fp32 CLIP / SigLIP towers (issue 16): what it skips must not change an answer.

- the embeddings run as two lookups and an add when they are transformers' own modules, and as the module whenever
  something could differ (hooks, a wrapped or max_norm lookup, edits of weights or of the position_ids buffer);
- activations are computed in the GEMM's output only where autograd records nothing, bit for bit the expression;
- an all-ones attention mask is dropped on the CPU (any dtype), a padded one is not;
- the result is bit-identical to transformers' SDPA model on the CPU in fp32 (the same aten kernels in the same
  order; the fused QKV GEMM gives the same sums here).
"""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPModel, CLIPTextModel, CLIPVisionModel

import fastenc
from fastenc.ops.activation import linear_activation_fn
from tests.test_clip import build, inputs_for, make_config
from tests.utils import FP32, compare_outputs


def _text(layers=2, **kw):
    model = build(CLIPTextModel, make_config(layers=layers, **kw))
    return model, fastenc.optimize(model, backend="torch")


def _ids(batch=2, seq=9):
    torch.manual_seed(1)
    ids = torch.randint(0, 90, (batch, seq))
    ids[:, -1] = 98  # eos
    return ids


def _same(model, fast, **inputs):
    with torch.no_grad():  # fastenc first: a max_norm lookup renormalises the weights it reads, in place
        got = fast(**inputs)
        compare_outputs(model(**inputs), got, FP32)


class _ScaledEmbedding(torch.nn.Module):  # a wrapper the direct lookup must not see through
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    @property
    def weight(self):
        return self.inner.weight

    def forward(self, ids):
        return self.inner(ids) * 3


EMBEDDING_EDITS = {
    "hook_on_token_embedding": lambda e: e.token_embedding.register_forward_hook(lambda m, a, out: out * 2),
    "pre_hook_on_embeddings": lambda e: e.register_forward_pre_hook(
        lambda m, args, kwargs: (args, {**kwargs, "input_ids": kwargs["input_ids"].flip(-1)}), with_kwargs=True
    ),
    "wrapped_position_embedding": lambda e: setattr(e, "position_embedding", _ScaledEmbedding(e.position_embedding)),
    "max_norm": lambda e: setattr(e.token_embedding, "max_norm", 0.05),
    "position_ids_buffer": lambda e: e.position_ids.copy_(e.position_ids.flip(-1)),
    "token_weight_data_assign": lambda e: setattr(e.token_embedding.weight, "data", torch.randn(99, 64)),
    "position_weight_mul": lambda e: e.position_embedding.weight.data.mul_(-2),
}


@pytest.mark.parametrize("edit", sorted(EMBEDDING_EDITS))
def test_text_embedding_edits_are_honoured(edit):
    model, fast = _text()
    ids = _ids()
    _same(model, fast, input_ids=ids)
    with torch.no_grad():
        before = fast(input_ids=ids).last_hidden_state
        EMBEDDING_EDITS[edit](model.embeddings)
    _same(model, fast, input_ids=ids)
    with torch.no_grad():
        assert not torch.equal(before, fast(input_ids=ids).last_hidden_state), "the edit changed nothing: a weak test"


def test_explicit_position_ids_are_used():
    model, fast = _text()
    ids = _ids()
    pos = torch.arange(9).flip(0)[None].expand(2, -1)
    _same(model, fast, input_ids=ids, position_ids=pos)


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu", "gelu_tanh", "relu"])
def test_inplace_activation_is_bit_identical(activation):
    torch.manual_seed(0)
    x, w, b = torch.randn(37, 24) * 4, torch.randn(40, 24), torch.randn(40)
    x[0, :4] = torch.tensor([float("inf"), -float("inf"), float("nan"), 3e38])
    want = linear_activation_fn(torch.float32, activation)(x, w, b)
    got = linear_activation_fn(torch.float32, activation, inplace=True)(x, w, b)
    assert torch.equal(want.nan_to_num(7.0), got.nan_to_num(7.0)) and torch.equal(want.isnan(), got.isnan())
    if activation == "quick_gelu":  # the 0-dim constant is the Python scalar's float
        y = torch.nn.functional.linear(x, w, b)
        assert torch.equal((y * torch.sigmoid(1.702 * y)).nan_to_num(7.0), got.nan_to_num(7.0))


def test_input_gradients_through_the_fast_loop_with_frozen_weights():
    """Saliency-style use: frozen weights, pixel_values.requires_grad. The fast loop runs under autograd then and
    must not compute anything in place."""
    model = build(CLIPVisionModel, make_config())
    model.requires_grad_(False)
    fast = fastenc.optimize(model, backend="torch")
    pixels = inputs_for(model, 2)["pixel_values"]
    grads = []
    for m in (model, fast):
        p = pixels.clone().requires_grad_(True)
        m(pixel_values=p).pooler_output.square().sum().backward()
        grads.append(p.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.float32])
def test_all_ones_mask_of_any_dtype_is_no_mask(dtype):
    model, fast = _text()
    ids = _ids()
    ones = torch.ones(2, 9, dtype=dtype)
    with torch.no_grad():
        none = fast(input_ids=ids).last_hidden_state
        assert torch.equal(fast(input_ids=ids, attention_mask=ones).last_hidden_state, none)
    _same(model, fast, input_ids=ids, attention_mask=ones)
    padded = ones.clone()
    padded[1, 5:] = 0
    _same(model, fast, input_ids=ids, attention_mask=padded)
    with torch.no_grad():  # the padded row's keys are masked: its output differs from the unmasked call
        assert not torch.equal(fast(input_ids=ids, attention_mask=padded).last_hidden_state[1], none[1])


@pytest.mark.parametrize("width,heads", [(32, 2), (128, 4)])
def test_torch_backend_is_bit_identical_to_transformers_sdpa(width, heads):
    config = make_config(width=width, heads=heads, layers=3)
    config.text_config._attn_implementation = config.vision_config._attn_implementation = "sdpa"
    model = build(CLIPModel, config)
    fast = fastenc.optimize(model, backend="torch")
    inputs = inputs_for(model, 3)
    inputs["attention_mask"][2, 4:] = 0
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            want, got = model(**inputs), fast(**inputs)
        for key in ("text_embeds", "image_embeds", "logits_per_image"):
            assert torch.equal(got[key], want[key]), (mode.__name__, key, (got[key] - want[key]).abs().max())
        for key in ("last_hidden_state", "pooler_output"):
            for tower in ("text_model_output", "vision_model_output"):
                assert torch.equal(got[tower][key], want[tower][key]), (mode.__name__, tower, key)


def test_triton_plan_resolves_backends_once_per_model(monkeypatch):
    """The triton plan decides each op's backend on the first forward of an input signature: a later forward runs no
    backend resolution and reads $FASTENC_BACKEND only where the model looks its plan up, not once per op."""
    import os

    from fastenc.core import dispatch

    if "triton" not in fastenc.available_backends():
        pytest.skip("needs triton (a CUDA device or TRITON_INTERPRET=1)")
    model = build(CLIPTextModel, make_config(layers=2))
    fast = fastenc.optimize(model, backend="triton")
    ids = _ids(batch=1, seq=5)
    with torch.no_grad():
        fast(input_ids=ids)  # decides
    calls = {"resolve": 0, "env": 0}
    can_run = dispatch._triton_can_run

    def counted_can_run(device):  # every backend resolution asks whether Triton runs on the device
        calls["resolve"] += 1
        return can_run(device)

    class CountingEnv(dict):
        def get(self, key, default=None):
            calls["env"] += key == dispatch.ENV_BACKEND
            return super().get(key, default)

    monkeypatch.setattr(dispatch, "_triton_can_run", counted_can_run)
    monkeypatch.setattr(os, "environ", CountingEnv(os.environ))
    with torch.no_grad(), fastenc.trace() as t:
        fast(input_ids=ids)
    assert t.counts["triton.attention"] == 2 and t.counts["triton.layer_norm"] >= 4, dict(t.counts)
    # the model asks for its plan once per tower stage (embeddings + layers, final norm): 2 reads, none per op
    assert calls == {"resolve": 0, "env": 2}, calls

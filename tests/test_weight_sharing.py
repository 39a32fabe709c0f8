"""The optimized model never gives a stale answer after its weights are edited, replaced or moved, by any path a
PyTorch user has: in-place edits through `.data`, `copy_`, fused and foreach optimizers, `load_state_dict` (with
and without assign=True), reassigned top-level parameters / modules, `.to()`, `requires_grad_` toggles; modules the
fused path cannot see through (LoRA-style wrappers, hooks) run as modules. Also: save_pretrained does not mutate
the shared object, and model-level fall-backs warn."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from transformers import CLIPModel, CLIPTextModel, SiglipTextModel, T5EncoderModel

import fastenc
from tests.test_clip import build, inputs_for, make_config
from tests.utils import FP32, compare_outputs

T5_CONFIG = dict(
    vocab_size=50,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_heads=4,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    dropout_rate=0.0,
)


def _clip(layers=1):
    model = build(CLIPModel, make_config(layers=layers))
    return model, fastenc.optimize(model, backend="torch"), inputs_for(model, 2)


def _check(model, fast, inputs):
    with torch.no_grad():
        compare_outputs(model(**inputs), fast(**inputs), FP32)


def _q(model):
    return model.text_model.encoder.layers[0].self_attn.q_proj


EDITS = {
    "data_mul": lambda m: _q(m).weight.data.mul_(2),
    "data_copy": lambda m: _q(m).weight.data.copy_(torch.randn_like(_q(m).weight)),
    "bias_data_add": lambda m: _q(m).bias.data.add_(1.0),
    "copy_no_grad": lambda m: torch.no_grad()(lambda: _q(m).weight.copy_(torch.randn_like(_q(m).weight)))(),
    "data_assign": lambda m: setattr(_q(m).weight, "data", torch.randn_like(_q(m).weight)),
    "load_state_dict": lambda m: m.load_state_dict({k: v * 1.5 for k, v in m.state_dict().items()}),
    "load_state_dict_assign": lambda m: m.load_state_dict(
        {k: v.clone() * 0.5 for k, v in m.state_dict().items()}, assign=True
    ),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_edit_after_first_call_is_seen(edit):
    """The first call builds the fused QKV weight; an edit by any path must show in the next call."""
    model, fast, inputs = _clip()
    _check(model, fast, inputs)
    EDITS[edit](model)
    _check(model, fast, inputs)


@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_optimizer_step_on_the_original_is_seen(kind):
    model, fast, inputs = _clip()
    _check(model, fast, inputs)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, **{kind: True})
    out = model(**inputs)
    (out.logits_per_image.sum() + out.text_embeds.sum()).backward()
    opt.step()
    _check(model, fast, inputs)
    opt.step()  # a second step edits the (now fused) storage in place again
    _check(model, fast, inputs)


def test_to_dtype_and_back_is_seen():
    model, fast, inputs = _clip()
    _check(model, fast, inputs)
    model.double()
    model.float()
    _q(model).weight.data.mul_(3)
    _check(model, fast, inputs)


def test_fused_weight_is_the_storage_of_q_k_v():
    """After a no-grad call, q/k/v (and their biases) are adjacent rows of one buffer: an edit costs nothing to
    follow, and the original model reads the same memory."""
    model, fast, inputs = _clip()
    _check(model, fast, inputs)
    attn = model.text_model.encoder.layers[0].self_attn
    q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert k.data_ptr() == q.data_ptr() + q.numel() * q.element_size()
    assert q.is_leaf and isinstance(q, torch.nn.Parameter) and q.requires_grad


def test_save_pretrained_after_fusing_reloads(tmp_path):
    """q/k/v sharing one storage must still save as three plain tensors and reload exactly."""
    model, fast, inputs = _clip()
    _check(model, fast, inputs)
    fast.save_pretrained(tmp_path / "fast")
    model.save_pretrained(tmp_path / "orig")
    for d in ("fast", "orig"):
        again = CLIPModel.from_pretrained(tmp_path / d).eval()
        _check(again, fast, inputs)


def test_gradients_flow_to_q_k_v_after_fusing():
    model, fast, inputs = _clip()
    _check(model, fast, inputs)
    fast.zero_grad()
    fast(**inputs).text_embeds.sum().backward()
    g_fast = _q(model).weight.grad.clone()
    model.zero_grad()
    model(**inputs).text_embeds.sum().backward()
    torch.testing.assert_close(g_fast, _q(model).weight.grad, atol=1e-5, rtol=1e-4)


def test_t5_gated_and_qkv_edits_are_seen():
    from transformers import T5Config

    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(**T5_CONFIG)).eval()
    fast = fastenc.optimize(model, backend="torch")
    inputs = {"input_ids": torch.randint(0, 50, (2, 9))}
    _check(model, fast, inputs)
    block = model.encoder.block[0]
    block.layer[0].SelfAttention.k.weight.data.mul_(2)
    block.layer[1].DenseReluDense.wi_1.weight.data.mul_(-1)
    _check(model, fast, inputs)


def test_reassigned_top_level_parameter_and_module_are_shared():
    model, fast, inputs = _clip()
    _check(model, fast, inputs)
    model.logit_scale = torch.nn.Parameter(torch.tensor(3.0))
    model.text_projection = torch.nn.Linear(64, 32, bias=False)
    model.register_buffer("extra", torch.ones(1))
    _check(model, fast, inputs)
    assert fast.extra is model.extra
    sd = {k: v.clone() + 0.01 for k, v in model.state_dict().items()}
    model.load_state_dict(sd, assign=True)
    _check(model, fast, inputs)


class _LoraLinear(torch.nn.Module):
    """A peft-style wrapper: the base layer plus a low-rank update, with the base's weight reachable as .weight."""

    def __init__(self, base: torch.nn.Linear, rank=2):
        super().__init__()
        self.base_layer = base
        self.lora_a = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.lora_b.weight)

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x):
        return self.base_layer(x) + self.lora_b(self.lora_a(x))


@pytest.mark.parametrize("where", ["q_proj", "out_proj", "fc1", "text_projection"])
def test_wrapped_linear_after_optimize_runs_as_module(where):
    model, fast, inputs = _clip()
    _check(model, fast, inputs)
    layer = model.text_model.encoder.layers[0]
    if where == "q_proj":
        layer.self_attn.q_proj = _LoraLinear(layer.self_attn.q_proj)
    elif where == "out_proj":
        layer.self_attn.out_proj = _LoraLinear(layer.self_attn.out_proj)
    elif where == "fc1":
        layer.mlp.fc1 = _LoraLinear(layer.mlp.fc1)
    else:
        model.text_projection = _LoraLinear(model.text_projection)
    _check(model, fast, inputs)


def test_forward_hook_on_a_linear_is_honoured():
    model, fast, inputs = _clip()
    _q(model).register_forward_hook(lambda mod, args, out: out * 2)
    _check(model, fast, inputs)


def test_attention_mask_of_the_wrong_shape_with_the_right_count_raises():
    for cls in (CLIPTextModel, SiglipTextModel):
        if cls is CLIPTextModel:
            model = build(CLIPTextModel, make_config())
        else:
            from tests.test_siglip import build as sbuild
            from tests.test_siglip import make_config as smake

            model = sbuild(SiglipTextModel, smake())
        fast = fastenc.optimize(model, backend="torch")
        ids = torch.randint(0, 90, (2, 8))
        with pytest.raises(fastenc.InputError, match="attention_mask"):
            fast(input_ids=ids, attention_mask=torch.ones(8, 2, dtype=torch.long))
        with pytest.raises(fastenc.InputError, match="attention_mask"):
            fast(input_ids=ids, attention_mask=torch.ones(16, dtype=torch.long))


def test_model_level_fallback_warns_and_records(monkeypatch):
    from fastenc.core import trace as _trace

    monkeypatch.setattr(_trace, "_warned", set())  # the warning is once per process: earlier tests may have spent it
    model = build(CLIPTextModel, make_config())
    fast = fastenc.optimize(model, backend="triton")
    ids = torch.randint(0, 90, (1, 6))
    with fastenc.trace() as t, warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fast(input_ids=ids, output_attentions=True)
    assert any(f.op == "attention" and "output_attentions" in f.reason for f in t.fallbacks)
    assert any(issubclass(x.category, fastenc.FallbackWarning) and "output_attentions" in str(x.message) for x in w)
    strict = fastenc.optimize(model, backend="triton", strict=True)
    with pytest.raises(fastenc.BackendUnavailableError, match="output_attentions"):
        strict(input_ids=ids, output_attentions=True)


def test_save_pretrained_does_not_change_the_class_seen_by_other_threads(tmp_path):
    model, fast, _ = _clip()
    seen = set()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.add(type(fast))

    th = threading.Thread(target=watch)
    th.start()
    try:
        for i in range(3):
            fast.save_pretrained(tmp_path / str(i))
    finally:
        stop.set()
        th.join()
    assert seen == {type(fast)}
    assert type(fast) is not CLIPModel


def test_two_optimized_models_over_one_model_share_one_layout():
    """A second optimize of the same weights finds q/k/v laid out already: no model moves them again."""
    model, a, inputs = _clip()
    b = fastenc.optimize(model, backend="torch")
    ptrs = set()
    with torch.no_grad():
        for m in (a, b, a, b):
            m(**inputs)
            ptrs.add(_q(model).weight.data_ptr())
    assert len(ptrs) == 1


def test_cuda_graph_sees_a_replaced_parameter():
    """A graphed model (replayed by the test double) drops its graphs when a parameter object is replaced."""
    from tests.test_graphs import graphed, text_inputs, text_model

    model = text_model()
    fast, cap = graphed(model)
    inputs = text_inputs(2, seed=3)
    with torch.no_grad():
        fast(**inputs)
        model.text_projection = torch.nn.Linear(
            model.text_projection.in_features, model.text_projection.out_features, bias=False
        )
        compare_outputs(model(**inputs), fast(**inputs), FP32)
    assert cap.captures == 2


def test_plain_attribute_edits_after_the_first_call_are_seen():
    """The fast loop keeps per-layer tensors between calls; a norm's eps or the attention scale set later still
    counts (plain attributes are not registered anywhere)."""
    model, fast, inputs = _clip(layers=2)
    _check(model, fast, inputs)
    layer = model.text_model.encoder.layers[1]
    layer.layer_norm1.eps = 0.5
    layer.self_attn.scale = 0.05
    _check(model, fast, inputs)


def _t5_block(model, i=0):
    return model.encoder.block[i]


T5_EDITS = {  # the T5 fast loop (t5_layer_weights) keeps per-block tensors between calls; each edit must show
    "q_data_mul": lambda m: _t5_block(m).layer[0].SelfAttention.q.weight.data.mul_(2),
    "o_data_assign": lambda m: setattr(
        _t5_block(m, 1).layer[0].SelfAttention.o, "weight", torch.nn.Parameter(torch.randn(32, 32))
    ),
    "wo_copy": lambda m: torch.no_grad()(lambda w: w.copy_(torch.randn_like(w)))(
        _t5_block(m).layer[1].DenseReluDense.wo.weight
    ),
    "wi_0_data_assign": lambda m: setattr(
        _t5_block(m).layer[1].DenseReluDense.wi_0.weight, "data", torch.randn(48, 32)
    ),
    "norm_weight_add": lambda m: _t5_block(m, 1).layer[1].layer_norm.weight.data.add_(0.5),
    "norm_eps": lambda m: setattr(_t5_block(m).layer[0].layer_norm, "variance_epsilon", 0.5),
    "table_mul": lambda m: _t5_block(m).layer[0].SelfAttention.relative_attention_bias.weight.data.mul_(3),
    "hook_on_wo": lambda m: (
        _t5_block(m, 1).layer[1].DenseReluDense.wo.register_forward_hook(lambda mod, args, out: out * 2)
    ),
    "lora_wi_1": lambda m: setattr(
        _t5_block(m).layer[1].DenseReluDense, "wi_1", _LoraLinear(_t5_block(m).layer[1].DenseReluDense.wi_1)
    ),
    "load_state_dict_assign": lambda m: m.load_state_dict(
        {k: v.clone() * 0.5 for k, v in m.state_dict().items()}, assign=True
    ),
}


@pytest.mark.parametrize("edit", sorted(T5_EDITS))
def test_t5_fast_loop_sees_every_edit(edit, monkeypatch):
    from transformers import T5Config

    import fastenc.models.t5 as t5

    calls = []
    real = t5._t5_fast_layers
    monkeypatch.setattr(t5, "_t5_fast_layers", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(**T5_CONFIG)).eval()
    fast = fastenc.optimize(model, backend="torch")
    inputs = {"input_ids": torch.randint(0, 50, (2, 9)), "attention_mask": torch.tensor([[1] * 9, [1] * 5 + [0] * 4])}
    _check(model, fast, inputs)
    _check(model, fast, inputs)  # the second call reuses the kept per-block tensors
    assert len(calls) == 2  # both calls took the fast loop
    T5_EDITS[edit](model)
    _check(model, fast, inputs)
    assert len(calls) == (2 if edit in ("hook_on_wo", "lora_wi_1") else 3)  # a hook or wrapper: the general loop


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_model_starts_with_empty_caches(how):
    """A deepcopy / pickle of an optimized model keeps its settings (backend, strict) and none of what the original
    kept between calls (fused buffers, per-layer tensors, the op plan): the copy builds its own on first use and
    answers as the original does."""
    import copy
    import pickle

    model, fast, inputs = _clip(layers=2)
    _check(model, fast, inputs)
    state = fast._fastenc
    assert state.fused and state._plan is not None
    twin = copy.deepcopy(fast) if how == "deepcopy" else pickle.loads(pickle.dumps(fast))
    kept = twin._fastenc
    assert (kept.backend, kept.strict) == (state.backend, state.strict)
    assert not kept.fused and kept._plan is None
    with torch.no_grad():
        compare_outputs(fast(**inputs), twin(**inputs), FP32)
    assert kept.fused and kept._plan is not None and kept._plan is not state._plan

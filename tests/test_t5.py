"""fastenc.optimize on T5EncoderModel / UMT5EncoderModel: parity against the untouched transformers model, torch and
Triton backends (Triton under TRITON_INTERPRET=1 on CPU: tiny configs), and the fp16 overflow policy."""

import copy

import pytest
import torch
from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

import fastenc
from tests.utils import assert_close, assert_error_within

FP32 = dict(atol=3e-5, rtol=1e-4)
VOCAB = 97


def make_config(
    d_model=32,
    d_kv=16,
    heads=2,
    layers=2,
    ff="gated-gelu",
    num_buckets=32,
    max_distance=128,
    cls=T5Config,
):
    return cls(
        vocab_size=VOCAB,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=2 * d_model,
        num_layers=layers,
        num_heads=heads,
        feed_forward_proj=ff,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=max_distance,
        dropout_rate=0.1,  # identity in eval mode, as in transformers
        pad_token_id=0,
    )


def build(config, cls=T5EncoderModel):
    torch.manual_seed(0)
    return cls(config).eval()


def inputs_for(batch, seq, *, pad=True):
    g = torch.Generator().manual_seed(seq * 31 + batch)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad and batch > 1 and seq > 1:
        mask[1, max(1, seq // 2) :] = 0  # right padding
        ids[1][mask[1] == 0] = 0
        if batch > 2:
            mask[2, : seq // 3] = 0  # left padding: T5's relative positions allow it
    return {"input_ids": ids, "attention_mask": mask}


def run_both(model, fast, inputs, **kw):
    with torch.no_grad():
        ref = model(**inputs, **kw)
        with fastenc.trace() as t:
            got = fast(**inputs, **kw)
    return ref, got, t


def compare_outputs(ref, got, fmt=FP32):
    assert type(ref) is type(got)
    assert list(ref.keys()) == list(got.keys()), (list(ref.keys()), list(got.keys()))
    for key in ref.keys():
        r, g = ref[key], got[key]
        if isinstance(r, torch.Tensor):
            assert_close(g, r, **fmt, name=key)
        elif isinstance(r, tuple):
            assert len(r) == len(g), key
            for i, (a, b) in enumerate(zip(r, g, strict=True)):
                assert_close(b, a, **fmt, name=f"{key}[{i}]")


def check_triton_trace(t, layers):
    assert t.counts["triton.attention"] == layers, dict(t.counts)
    assert t.counts["torch.attention"] == 0
    assert t.counts["triton.rms_norm"] == 2 * layers + 1
    assert not t.fallbacks


# (ff, d_model, d_kv, heads, num_buckets, max_distance, batch, seq); d_kv * heads != d_model in most
TRITON_CASES = [
    ("gated-gelu", 32, 16, 2, 32, 128, 1, 1),
    ("relu", 32, 48, 2, 32, 20, 3, 13),
    ("gated-gelu", 64, 64, 2, 8, 20, 2, 100),
    ("relu", 48, 16, 3, 8, 128, 2, 37),
    ("gated-gelu", 32, 16, 2, 32, 20, 2, 300),
]


@pytest.mark.parametrize("ff, d_model, d_kv, heads, nb, md, batch, seq", TRITON_CASES, ids=lambda x: str(x))
def test_parity_triton(ff, d_model, d_kv, heads, nb, md, batch, seq):
    model = build(make_config(d_model, d_kv, heads, ff=ff, num_buckets=nb, max_distance=md))
    fast = fastenc.optimize(model, backend="triton", strict=True)
    assert type(fast).__name__ == "FastT5EncoderModel"
    ref, got, t = run_both(model, fast, inputs_for(batch, seq))
    compare_outputs(ref, got)
    check_triton_trace(t, 2)
    gated = ff.startswith("gated")
    assert t.counts["triton.gated_activation" if gated else "triton.bias_activation"] == 2


TORCH_CASES = [
    ("relu", 32, 48, 2, 32, 128, 3, 1),
    ("gated-gelu", 32, 16, 2, 8, 20, 3, 13),
    ("relu", 64, 64, 2, 32, 20, 2, 100),
    ("gated-gelu", 32, 16, 2, 32, 128, 2, 600),
    ("gated-gelu", 32, 48, 2, 8, 128, 3, 257),
]


@pytest.mark.parametrize("ff, d_model, d_kv, heads, nb, md, batch, seq", TORCH_CASES, ids=lambda x: str(x))
def test_parity_torch(ff, d_model, d_kv, heads, nb, md, batch, seq):
    model = build(make_config(d_model, d_kv, heads, ff=ff, num_buckets=nb, max_distance=md))
    fast = fastenc.optimize(model, backend="torch", strict=True)
    ref, got, t = run_both(model, fast, inputs_for(batch, seq))
    compare_outputs(ref, got)
    assert t.counts["torch.attention"] == 2 and not t.fallbacks


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hidden_states_and_tuple_output(backend):
    model = build(make_config(ff="relu", d_kv=24))
    fast = fastenc.optimize(model, backend=backend, strict=True)
    inputs = inputs_for(3, 11)
    ref, got, _ = run_both(model, fast, inputs, output_hidden_states=True)
    assert len(got.hidden_states) == 3  # embeddings, layer 0's output, the final norm's output (as transformers)
    compare_outputs(ref, got)
    with torch.no_grad():
        ref_t = model(**inputs, return_dict=False)
        got_t = fast(**inputs, return_dict=False)
    assert isinstance(got_t, tuple) and len(got_t) == len(ref_t) == 1
    assert_close(got_t[0], ref_t[0], **FP32)


def test_inputs_embeds_and_no_mask():
    model = build(make_config())
    fast = fastenc.optimize(model, backend="triton", strict=True)
    emb = torch.randn(2, 9, 32)
    ref, got, t = run_both(model, fast, {"inputs_embeds": emb})
    compare_outputs(ref, got)
    check_triton_trace(t, 2)


def test_output_attentions_runs_torch_and_says_so():
    model = build(make_config(layers=3))
    model.config._attn_implementation = "eager"
    fast = fastenc.optimize(model, backend="triton")
    ref, got, t = run_both(model, fast, inputs_for(3, 9), output_attentions=True)
    assert len(got.attentions) == 3
    compare_outputs(ref, got)
    assert t.counts["torch.attention"] == 3 and t.counts["triton.attention"] == 0
    assert {f.reason for f in t.fallbacks} == {"output_attentions=True needs the probabilities"}
    strict = fastenc.optimize(model, backend="triton", strict=True)
    with pytest.raises(fastenc.BackendUnavailableError, match="output_attentions"):
        strict(**inputs_for(3, 9), output_attentions=True)


def test_training_mode_with_dropout_runs_transformers():
    model = build(make_config())
    fast = fastenc.optimize(model, backend="triton")
    fast.train()
    with fastenc.trace() as t:
        out = fast(**inputs_for(2, 5))
    assert out.last_hidden_state.shape == (2, 5, 32)
    assert [f.op for f in t.fallbacks] == ["t5_encoder"] and t.counts["triton.attention"] == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_umt5_per_layer_bias_tables(backend):
    model = build(make_config(cls=UMT5Config, d_kv=24, layers=3, ff="gated-gelu", max_distance=20), UMT5EncoderModel)
    tables = [blk.layer[0].SelfAttention.relative_attention_bias.weight for blk in model.encoder.block]
    assert len({t.data_ptr() for t in tables}) == 3  # one table per layer
    fast = fastenc.optimize(model, backend=backend, strict=True)
    assert type(fast).__name__ == "FastUMT5EncoderModel"
    ref, got, t = run_both(model, fast, inputs_for(3, 23), output_hidden_states=True)
    compare_outputs(ref, got)
    assert t.counts[f"{backend}.attention"] == 3 and not t.fallbacks


def test_save_pretrained_and_from_pretrained_roundtrip(tmp_path):
    model = build(make_config())
    model.save_pretrained(tmp_path / "orig")
    loaded = T5EncoderModel.from_pretrained(tmp_path / "orig").eval()
    fast = fastenc.optimize(loaded, backend="triton", strict=True)
    ref, got, _ = run_both(model, fast, inputs_for(2, 7))
    compare_outputs(ref, got)
    fast.save_pretrained(tmp_path / "fast")  # reloads with plain transformers
    reloaded = T5EncoderModel.from_pretrained(tmp_path / "fast").eval()
    assert reloaded.config.architectures == ["T5EncoderModel"]
    ref2, got2, _ = run_both(reloaded, fast, inputs_for(2, 7))
    compare_outputs(ref2, got2)


def test_bad_inputs_raise_named_errors():
    model = build(make_config())
    fast = fastenc.optimize(model)
    good = inputs_for(2, 6)
    with pytest.raises(fastenc.InputError, match="input_ids must be an integer tensor"):
        fast(**{**good, "input_ids": good["input_ids"].float()})
    with pytest.raises(fastenc.InputError, match="attention_mask must have shape"):
        fast(**{**good, "attention_mask": good["attention_mask"][:, :3]})
    with pytest.raises(fastenc.InputError, match="exactly one"):
        fast(inputs_embeds=torch.randn(2, 6, 32), **good)
    with pytest.raises(fastenc.InputError, match="exactly one"):
        fast(attention_mask=good["attention_mask"])
    with pytest.raises(fastenc.InputError, match="d_model=32"):
        fast(inputs_embeds=torch.randn(2, 6, 31))
    with pytest.raises(fastenc.InputError, match="sequence >= 1"):
        fast(input_ids=torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(fastenc.InputError, match="does not implement"):
        fast(**good, use_cache=True)


def test_unsupported_configs():
    config = make_config()
    config.is_decoder = True
    with pytest.raises(fastenc.UnsupportedModelError, match="is_decoder"):
        fastenc.optimize(build(config))
    config = make_config()
    config.dense_act_fn = "silu"  # no fused kernel: runs as its module (tests/test_config_fields.py)
    model = build(config)
    ref, got, t = run_both(model, fastenc.optimize(model, backend="torch"), inputs_for(2, 5))
    compare_outputs(ref, got)
    assert t.counts["torch.module"] == 2


# ------------------------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_half_precision_within_twice_pytorch_error(dtype, backend):
    """Where transformers is finite in dtype, ours is finite and within 2x its error against fp32."""
    model32 = build(make_config(d_model=64, d_kv=16, heads=4))
    half = copy.deepcopy(model32).to(dtype)
    fast = fastenc.optimize(half, backend=backend, strict=True)
    inputs = inputs_for(3, 29)
    with torch.no_grad():
        ref32 = model32(**inputs, output_hidden_states=True)
        ref_half = half(**inputs)
        got = fast(**inputs, output_hidden_states=True)
    assert torch.isfinite(ref_half.last_hidden_state).all()
    assert got.last_hidden_state.dtype == dtype
    assert all(h.dtype == dtype for h in got.hidden_states)
    assert_error_within(
        got.last_hidden_state, ref_half.last_hidden_state, ref32.last_hidden_state, factor=2.0, atol=1e-3, name="last"
    )


def _overflowing(scale):
    """A model whose FFN output (`wo`) and residual stream exceed fp16's 65504 while fp32 stays finite."""
    model32 = build(make_config(d_model=64, d_kv=16, heads=4))
    with torch.no_grad():
        for block in model32.encoder.block:
            block.layer[-1].DenseReluDense.wo.weight.mul_(scale)
    return model32


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_overflow_stays_finite_and_close_to_fp32(backend):
    """transformers' fp16 residual overflows (clamped to finfo.max - 1000: finite but wrong, error ~1.5 here); ours
    keeps the residual in fp32 and matches the fp32 model to within 2x the bf16 model's error (max abs error ~5e-3
    on outputs of magnitude ~3)."""
    model32 = _overflowing(40000.0)
    inputs = inputs_for(3, 29)
    half = copy.deepcopy(model32).half()
    assert torch.isfinite(half.encoder.block[0].layer[-1].DenseReluDense.wo.weight).all()
    fast = fastenc.optimize(half, backend=backend, strict=True)
    with torch.no_grad():
        ref32 = model32(**inputs, output_hidden_states=True)
        ref16 = half(**inputs)
        ref_bf16 = copy.deepcopy(model32).bfloat16()(**inputs)
        got = fast(**inputs, output_hidden_states=True)
    assert max(h.abs().max().item() for h in ref32.hidden_states) > 65504  # fp16 cannot hold the residual
    last32 = ref32.last_hidden_state
    hf_err = (ref16.last_hidden_state.float() - last32).abs().max().item()
    bf16_err = (ref_bf16.last_hidden_state.float() - last32).abs().max().item()
    assert hf_err > 0.5  # transformers' fp16 result is wrong here
    assert all(torch.isfinite(h).all() for h in got.hidden_states)  # saturated to +-65504, never inf
    assert torch.isfinite(got.last_hidden_state).all()
    err = (got.last_hidden_state.float() - last32).abs().max().item()
    assert err <= 2 * bf16_err and err < 2e-2, (err, bf16_err, hf_err)


def test_fp16_with_wo_kept_in_fp32():
    """from_pretrained(dtype=float16) keeps `wo` in fp32 (_keep_in_fp32_modules); the fused model follows it."""
    model32 = _overflowing(40000.0)
    half = copy.deepcopy(model32).half()
    for block in half.encoder.block:
        block.layer[-1].DenseReluDense.wo.float()
    fast = fastenc.optimize(half, backend="triton", strict=True)
    inputs = inputs_for(2, 17)
    with torch.no_grad():
        ref32 = model32(**inputs).last_hidden_state
        ref16 = half(**inputs).last_hidden_state
        got = fast(**inputs).last_hidden_state
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert_error_within(got, ref16, ref32, factor=2.0, atol=2e-3, name="last")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_match_transformers(backend):
    model = build(make_config(ff="gated-gelu", d_kv=24))
    fast = fastenc.optimize(model, backend=backend, strict=True)
    inputs = inputs_for(3, 10)
    w = torch.randn(3, 10, 32)
    params = list(model.parameters())
    ref = torch.autograd.grad((model(**inputs).last_hidden_state * w).sum(), params, allow_unused=True)
    got = torch.autograd.grad((fast(**inputs).last_hidden_state * w).sum(), params, allow_unused=True)
    names = [n for n, _ in model.named_parameters()]
    for name, r, g in zip(names, ref, got, strict=True):
        assert (r is None) == (g is None), name
        if r is not None:
            assert_close(g, r, atol=1e-5, rtol=1e-4, name=f"d {name}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("ff", ["gated-gelu", "relu"])
def test_fast_loop_parity_without_a_trace(backend, ff, monkeypatch):
    """No trace, no hidden states: the prevalidated block loop (`_t5_fast_layers`) runs; outputs match transformers,
    padded rows included. UMT5 (a table per block) keeps the general loop."""
    import fastenc.models.t5 as t5

    calls = []
    real = t5._t5_fast_layers
    monkeypatch.setattr(t5, "_t5_fast_layers", lambda *a: calls.append(1) or real(*a))
    model = build(make_config(layers=3, ff=ff))
    fast = fastenc.optimize(model, backend=backend)
    inputs = inputs_for(3, 19)
    with torch.no_grad():
        compare_outputs(model(**inputs), fast(**inputs))
        compare_outputs(model(**inputs), fast(**inputs))
    assert len(calls) == 2
    umt5 = build(make_config(cls=UMT5Config, layers=2), UMT5EncoderModel)
    with torch.no_grad():
        compare_outputs(umt5(**inputs), fastenc.optimize(umt5, backend=backend)(**inputs))
    assert len(calls) == 2

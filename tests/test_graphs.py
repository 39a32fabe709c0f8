"""fastenc.optimize(..., cuda_graphs=...): shape keys, batch buckets, the LRU cache, fall-backs and output ownership.

On CPU the graph mechanism is a test double (`ReplayCapturer`) with a real graph's aliasing: replay re-runs the
captured forward on the same static input buffers and writes into the same static output tensors. The tests at the
end use real CUDA graphs and skip without a GPU.
"""

import inspect
import warnings

import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
    Siglip2Config,
    Siglip2VisionModel,
    SiglipConfig,
    SiglipModel,
    T5Config,
    T5EncoderModel,
)

import fastenc
from fastenc.core.errors import BackendUnavailableError, InputError
from fastenc.graphs import GraphConfig, _tree_leaves, clear_graphs
from fastenc.models.clip import FastCLIPTextModelWithProjection
from fastenc.parity import clip_inputs
from tests.utils import FP32, compare_outputs

VOCAB = 99
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class _FakeGraph:
    def __init__(self, owner, fn, outputs):
        self.owner, self.fn, self.outputs = owner, fn, outputs

    def replay(self):
        self.owner.replays += 1
        new = self.fn()  # reads the static input buffers, like the kernels a real graph recorded
        for (_, static), (_, fresh) in zip(_tree_leaves(self.outputs), _tree_leaves(new), strict=True):
            static.copy_(fresh)  # a real replay rewrites the same output memory


class ReplayCapturer:
    """Test double of fastenc.graphs.CudaGraphCapturer that runs on any device: warm-up calls, then a "capture" call
    whose outputs are left as garbage (NaN), as a real capture leaves them until the first replay."""

    def __init__(self):
        self.captures = 0
        self.replays = 0
        self.warmups = 0

    def unsupported(self, device):
        return None

    def capture(self, fn, warmup, device):
        for _ in range(warmup):
            fn()
            self.warmups += 1
        self.captures += 1
        out = fn()
        for _, leaf in _tree_leaves(out):  # a real capture records kernels without running them: garbage outputs
            leaf.fill_(float("nan") if leaf.is_floating_point() else -1)
        return _FakeGraph(self, fn, out)


def clip_config(layers=1, max_pos=77):
    text = dict(
        hidden_size=32,
        num_attention_heads=2,
        num_hidden_layers=layers,
        intermediate_size=64,
        max_position_embeddings=max_pos,
        vocab_size=VOCAB,
        eos_token_id=VOCAB - 1,
        bos_token_id=VOCAB - 2,
        pad_token_id=VOCAB - 1,
    )
    vision = dict(
        hidden_size=32,
        num_attention_heads=2,
        num_hidden_layers=layers,
        intermediate_size=64,
        image_size=16,
        patch_size=8,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def build(cls, config):
    torch.manual_seed(0)
    return cls(config).eval()


def text_model(cls=CLIPTextModelWithProjection):
    return build(cls, clip_config().text_config)


def graphed(model, strict=False, **kw):
    capturer = kw.pop("capturer", None) or ReplayCapturer()
    fast = fastenc.optimize(model, backend="torch", strict=strict, cuda_graphs=GraphConfig(capturer=capturer, **kw))
    return fast, capturer


def text_inputs(batch, seq=77, seed=0):
    return clip_inputs(clip_config().text_config, batch, seq=seq, seed=seed)


def eager(model):
    return fastenc.optimize(model, backend="torch")


# ------------------------------------------------------------------------------------------------------ API


def test_config_validation():
    for bad in (dict(batch_buckets=[0, 2]), dict(batch_buckets=()), dict(batch_buckets=4), dict(max_graphs=0)):
        with pytest.raises(InputError, match="cuda_graphs"):
            GraphConfig(**bad)
    with pytest.raises(InputError, match="cuda_graphs.outputs"):
        GraphConfig(outputs="view")
    with pytest.raises(InputError, match="cuda_graphs.warmup"):
        GraphConfig(warmup=0)
    with pytest.raises(InputError, match="cuda_graphs must be a bool"):
        fastenc.optimize(text_model(), cuda_graphs="yes")
    cfg = GraphConfig(batch_buckets=[8, 1, 2, 2])
    assert cfg.batch_buckets == (1, 2, 8)
    assert [cfg.bucket(b) for b in (1, 2, 3, 8, 9)] == [1, 2, 8, 8, None]
    assert GraphConfig(batch_buckets=None).bucket(37) == 37


def test_class_signature_and_reoptimize(tmp_path):
    model = text_model()
    fast = fastenc.optimize(model, backend="torch", cuda_graphs=True)
    assert isinstance(fast, CLIPTextModelWithProjection) and isinstance(fast, FastCLIPTextModelWithProjection)
    assert inspect.signature(fast.forward) == inspect.signature(eager(model).forward)
    assert fast._fastenc_graphs.config == GraphConfig()
    plain = fastenc.optimize(fast, backend="torch")
    assert type(plain) is FastCLIPTextModelWithProjection and "_fastenc_graphs" not in plain.__dict__
    again = fastenc.optimize(fast, backend="torch", cuda_graphs=True)
    assert again._fastenc_graphs is not fast._fastenc_graphs
    assert not hasattr(model, "_fastenc_graphs")
    fast.save_pretrained(tmp_path)
    reloaded = CLIPTextModelWithProjection.from_pretrained(tmp_path)
    assert reloaded.config.architectures == ["CLIPTextModelWithProjection"]
    full = fastenc.optimize(build(CLIPModel, clip_config()), backend="torch", cuda_graphs=True)
    assert "get_text_features" in type(full).__dict__ and "get_image_features" in type(full).__dict__


# ------------------------------------------------------------------------------------------------------ buckets


def test_clip_text_parity_and_buckets():
    """Batches 1, 3, 5 at 77 tokens run in buckets 1, 4, 8; each matches eager fastenc and transformers."""
    model = text_model()
    ref = eager(model)
    fast, cap = graphed(model)
    with torch.no_grad():
        for batch, captures in ((1, 1), (3, 2), (5, 3), (4, 3), (3, 3)):
            inputs = text_inputs(batch, seed=batch)
            with fastenc.trace() as t:
                got = fast(**inputs)
            compare_outputs(ref(**inputs), got)
            compare_outputs(model(**inputs), got)
            assert got.text_embeds.shape == (batch, model.config.projection_dim)
            assert cap.captures == captures
    assert [k[2][0][1][0] for k in fast._fastenc_graphs.graphs] == [1, 8, 4]  # attention_mask's padded batch, LRU order
    assert t.counts["cuda_graph.replay"] == 1 and "cuda_graph.capture" not in t.counts


def test_padding_rows_do_not_change_real_rows():
    """Batch 3 in bucket 4: whatever the padding row holds, the real rows equal the same rows of a batch-4 call."""
    fast, _ = graphed(text_model(), outputs="static")
    a, b = text_inputs(4, seed=1), text_inputs(4, seed=2)
    with torch.inference_mode():
        full = {k: v.clone() for k, v in fast(**a).items()}
        fast(**b)  # the padding row now holds b's last row
        part = fast(**{k: v[:3] for k, v in a.items()})
    for k, v in full.items():
        assert part[k].shape[0] == 3
        assert torch.equal(part[k], v[:3]), k


def test_trace_counts_one_forward_at_capture_and_none_at_replay():
    model = text_model()
    fast, cap = graphed(model, warmup=3)
    inputs = text_inputs(2)
    with torch.no_grad():
        with fastenc.trace() as te:
            eager(model)(**inputs)
        with fastenc.trace() as tc:
            fast(**inputs)
        with fastenc.trace() as tr:
            fast(**inputs)
    assert cap.warmups == 3
    captured = {k: v for k, v in tc.counts.items() if not k.startswith("cuda_graph.")}
    assert captured == dict(te.counts)  # warm-up passes hidden, the captured pass counted once
    assert tc.counts["cuda_graph.capture"] == 1
    assert dict(tr.counts) == {"cuda_graph.replay": 1}


def test_return_tuple_and_hidden_states():
    model = text_model(CLIPTextModel)
    fast, _ = graphed(model)
    inputs = text_inputs(3)
    with torch.no_grad():
        for kw in (dict(return_dict=False), dict(output_hidden_states=True), dict(output_hidden_states=True)):
            got, ref = fast(**inputs, **kw), eager(model)(**inputs, **kw)
            if isinstance(ref, tuple):
                assert isinstance(got, tuple) and len(got) == len(ref)
                for g, r in zip(got, ref, strict=True):
                    torch.testing.assert_close(g, r, **FP32)
            else:
                compare_outputs(ref, got)
                assert len(got.hidden_states) == 2 and got.hidden_states[0].shape[0] == 3
    assert len(fast._fastenc_graphs.graphs) == 2  # return_dict=False and output_hidden_states=True: two keys


def test_positional_arguments_share_the_key():
    fast, cap = graphed(text_model())
    inputs = text_inputs(2)
    with torch.no_grad():
        a = fast(inputs["input_ids"], inputs["attention_mask"])
        b = fast(**inputs)
    assert cap.captures == 1
    assert torch.equal(a.text_embeds, b.text_embeds)


def test_exact_batches_without_buckets():
    fast, cap = graphed(text_model(), batch_buckets=None)
    with torch.no_grad():
        for batch in (3, 5, 3):
            fast(**text_inputs(batch))
    assert cap.captures == 2
    assert sorted(k[2][0][1][0] for k in fast._fastenc_graphs.graphs) == [3, 5]


# ------------------------------------------------------------------------------------------------------ ownership


def test_copy_outputs_survive_the_next_call():
    model = text_model()
    fast, _ = graphed(model)
    a, b = text_inputs(3, seed=1), text_inputs(3, seed=2)
    with torch.no_grad():
        first = fast(**a)
        saved = first.last_hidden_state.clone()
        second = fast(**b)
    assert torch.equal(first.last_hidden_state, saved)
    assert not torch.equal(first.last_hidden_state, second.last_hidden_state)
    static = fast._fastenc_graphs.graphs[next(iter(fast._fastenc_graphs.graphs))].graph.outputs
    for _, leaf in _tree_leaves(second):
        assert all(leaf.untyped_storage().data_ptr() != s.untyped_storage().data_ptr() for _, s in _tree_leaves(static))


def test_static_outputs_alias_the_graph_buffers():
    """outputs="static": views of the graph's outputs, overwritten by the next call; documented opt-in."""
    model = text_model()
    fast, _ = graphed(model, outputs="static")
    a, b = text_inputs(3, seed=1), text_inputs(3, seed=2)
    with torch.no_grad():
        first = fast(**a)
        expect_a = eager(model)(**a).text_embeds
        torch.testing.assert_close(first.text_embeds, expect_a, **FP32)
        fast(**b)
        expect_b = eager(model)(**b).text_embeds
    torch.testing.assert_close(first.text_embeds, expect_b, **FP32)  # overwritten in place
    assert not torch.allclose(expect_a, expect_b)


# ------------------------------------------------------------------------------------------------------ cache


def test_lru_eviction():
    fast, cap = graphed(text_model(), max_graphs=2)
    runner = fast._fastenc_graphs
    with torch.no_grad(), fastenc.trace() as t:
        for seq in (8, 9, 8, 10, 9, 8):  # 8, 9 captured; 8 hit; 10 evicts 9 (least recent); 9 evicts 8; 8 evicts 10
            fast(**text_inputs(1, seq=seq))
    assert cap.captures == 5 and t.counts["cuda_graph.evict"] == 3 and t.counts["cuda_graph.replay"] == 1
    assert [k[2][0][1][1] for k in runner.graphs] == [9, 8]


def test_weight_update_recaptures():
    """An in-place weight change (q_proj: also the cached fused QKV weight) drops the graphs, so outputs follow it."""
    model = text_model()
    fast, cap = graphed(model)
    inputs = text_inputs(2)
    with torch.no_grad():
        fast(**inputs)
        model.text_model.encoder.layers[0].self_attn.q_proj.weight.mul_(2.0)
        with fastenc.trace() as t:
            got = fast(**inputs)
        compare_outputs(model(**inputs), got)
    assert cap.captures == 2 and t.counts["cuda_graph.invalidate"] == 1
    clear_graphs(fast)
    assert not fast._fastenc_graphs.graphs
    with pytest.raises(InputError, match="cuda_graphs"):
        clear_graphs(eager(model))


def test_weight_replaced_by_its_transpose_recaptures():
    """`w.data = w.data.t()` keeps the data pointer and the version counter (and, for a square weight, the shape):
    the strides tell the graphs are stale."""
    model = text_model()
    fast, cap = graphed(model)
    inputs = text_inputs(2)
    w = model.text_model.encoder.layers[0].self_attn.out_proj.weight  # (32, 32)
    with torch.no_grad():
        fast(**inputs)
        ptr, version = w.data_ptr(), w._version
        w.data = w.data.t()
        assert (w.data_ptr(), w._version, w.shape) == (ptr, version, (32, 32))
        with fastenc.trace() as t:
            got = fast(**inputs)
        compare_outputs(model(**inputs), got)
    assert cap.captures == 2 and t.counts["cuda_graph.invalidate"] == 1


def test_weight_check_off_keeps_stale_graphs():
    """check_weights=False trades the per-call check for a stale graph after weight changes (documented)."""
    model = text_model()
    fast, cap = graphed(model, check_weights=False)
    inputs = text_inputs(1)
    with torch.no_grad():
        before = fast(**inputs).text_embeds
        model.text_projection.weight.mul_(2.0)
        stale = fast(**inputs).text_embeds
        clear_graphs(fast)
        fresh = fast(**inputs).text_embeds
    assert cap.captures == 2
    torch.testing.assert_close(fresh, 2 * before, **FP32)
    torch.testing.assert_close(stale, 2 * before, **FP32)  # the projection is read from weight memory at replay


def test_inference_mode_and_no_grad_are_separate_graphs():
    fast, cap = graphed(text_model())
    inputs = text_inputs(1)
    with torch.inference_mode():
        a = fast(**inputs)
    with torch.no_grad():
        b = fast(**inputs)
    assert cap.captures == 2
    assert torch.equal(a.text_embeds, b.text_embeds)


# ------------------------------------------------------------------------------------------------------ fall-backs


def _expect_fallback(fast, inputs, match, grad=False, **kw):
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx, fastenc.trace() as t, warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fast(**inputs, **kw)
    assert t.counts["eager.cuda_graph_fallback"] == 1 and "cuda_graph.capture" not in t.counts
    assert any(match in f.reason for f in t.fallbacks if f.op == "cuda_graph"), t.fallbacks
    del w
    return out


def test_fallbacks_run_eager_and_are_recorded():
    model = text_model()
    ref = eager(model)
    fast, cap = graphed(model, batch_buckets=(1, 2))
    x = text_inputs(2)
    with torch.no_grad():
        compare_outputs(
            ref(**x, output_attentions=True), _expect_fallback(fast, x, "output_attentions", output_attentions=True)
        )
    _expect_fallback(fast, x, "autograd", grad=True)
    big = text_inputs(3)
    with torch.no_grad():
        compare_outputs(ref(**big), _expect_fallback(fast, big, "above the largest"))
    fast.train()
    _expect_fallback(fast, x, "training")
    fast.eval()
    assert cap.captures == 0
    cpu, _ = graphed(model, capturer=fastenc.graphs.CudaGraphCapturer())
    _expect_fallback(cpu, x, "CUDA graphs need CUDA tensors")


def test_strict_raises_instead_of_falling_back():
    strict, _ = graphed(text_model(), strict=True, batch_buckets=(1,))
    with torch.no_grad(), pytest.raises(BackendUnavailableError, match="above the largest graph batch bucket"):
        strict(**text_inputs(2))


def test_bad_arguments_get_the_eager_error():
    fast, cap = graphed(text_model())
    with torch.no_grad():
        with pytest.raises(InputError, match="fastenc does not implement"):
            fast(**text_inputs(1), bogus=1)
        with pytest.raises(InputError, match="input_ids must be an integer tensor"):
            fast(input_ids=torch.zeros(1, 4))
    assert cap.captures == 0 and not fast._fastenc_graphs.graphs


def test_siglip2_vision_falls_back():
    cfg = Siglip2Config(
        vision_config=dict(
            hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64, patch_size=4
        )
    )
    model = build(Siglip2VisionModel, cfg.vision_config)
    fast, _ = graphed(model)
    px = torch.randn(2, 16, 3 * 16)
    shapes = torch.tensor([[4, 4], [2, 4]])
    mask = torch.zeros(2, 16, dtype=torch.long)
    mask[0], mask[1, :8] = 1, 1
    got = _expect_fallback(
        fast, dict(pixel_values=px, pixel_attention_mask=mask, spatial_shapes=shapes), "spatial_shapes"
    )
    with torch.no_grad():
        compare_outputs(model(pixel_values=px, pixel_attention_mask=mask, spatial_shapes=shapes), got)


def test_unsliceable_output_is_refused_once(monkeypatch):
    """A padded capture whose output has no batch dimension is dropped, remembered and served eagerly."""
    import fastenc.graphs as graphs

    real = graphs._batch_groups
    monkeypatch.setattr(
        graphs, "_batch_groups", lambda path, groups: None if path[0] == "text_embeds" else real(path, groups)
    )
    model = text_model()
    fast, cap = graphed(model)
    x = text_inputs(3)
    first = _expect_fallback(fast, x, "text_embeds has no batch dimension")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = fast(**x)
        compare_outputs(eager(model)(**x), again)
    assert cap.captures == 1 and not fast._fastenc_graphs.graphs
    assert torch.equal(first.text_embeds, again.text_embeds)


class FailingCapturer(ReplayCapturer):
    """Warm-up passes run; the capture pass fails, as a host sync inside a real capture would."""

    def capture(self, fn, warmup, device):
        for _ in range(warmup):
            fn()
        self.captures += 1
        raise RuntimeError("operation not permitted when stream is capturing")


def test_failed_capture_falls_back_once():
    model = text_model()
    fast, cap = graphed(model, capturer=FailingCapturer())
    x = text_inputs(1)
    got = _expect_fallback(fast, x, "capture failed: RuntimeError")
    with torch.no_grad():
        compare_outputs(eager(model)(**x), got)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fast(**x)
    assert cap.captures == 1
    strict, _ = graphed(model, strict=True, capturer=FailingCapturer())
    with torch.no_grad(), pytest.raises(BackendUnavailableError, match="capture failed"):
        strict(**x)


def test_deepcopy_starts_without_graphs():
    import copy

    fast, cap = graphed(text_model())
    with torch.no_grad():
        fast(**text_inputs(1))
    twin = copy.deepcopy(fast)
    assert type(twin) is type(fast) and not twin._fastenc_graphs.graphs and fast._fastenc_graphs.graphs
    with torch.no_grad():
        compare_outputs(fast(**text_inputs(1)), twin(**text_inputs(1)))


# ------------------------------------------------------------------------------------------------------ towers


def test_vision_tower():
    model = build(CLIPVisionModelWithProjection, clip_config().vision_config)
    fast, cap = graphed(model)
    with torch.no_grad():
        for batch in (1, 3):
            px = torch.randn(batch, 3, 16, 16)
            compare_outputs(model(pixel_values=px), fast(pixel_values=px))
    assert cap.captures == 2


def test_clip_model_pads_both_batches_and_slices_logits():
    model = build(CLIPModel, clip_config())
    ref = eager(model)
    fast, cap = graphed(model)
    text = text_inputs(3)
    px = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        got = fast(**text, pixel_values=px)
        assert got.logits_per_text.shape == (3, 5) and got.logits_per_image.shape == (5, 3)
        compare_outputs(model(**text, pixel_values=px), got)
        key = next(iter(fast._fastenc_graphs.graphs))
        assert {s[0]: s[1][0] for s in key[2]} == {"attention_mask": 4, "input_ids": 4, "pixel_values": 8}
        loss = fast(**text, pixel_values=px[:3], return_loss=True)  # a batch-wide loss: exact batch, no padding
        compare_outputs(ref(**text, pixel_values=px[:3], return_loss=True), loss)
        key = list(fast._fastenc_graphs.graphs)[-1]
        assert {s[0]: s[1][0] for s in key[2]} == {"attention_mask": 3, "input_ids": 3, "pixel_values": 3}
        feats = fast.get_text_features(**text)  # graphed too
        compare_outputs(ref.get_text_features(**text), feats)
    assert cap.captures == 3


def test_siglip_model_and_t5():
    sig = SiglipConfig(
        text_config=dict(
            hidden_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            intermediate_size=64,
            max_position_embeddings=16,
            vocab_size=VOCAB,
            projection_size=32,
        ),
        vision_config=dict(
            hidden_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            intermediate_size=64,
            image_size=16,
            patch_size=8,
        ),
    )
    model = build(SiglipModel, sig)
    fast, _ = graphed(model)
    ids = torch.randint(0, VOCAB, (3, 16))
    px = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        compare_outputs(model(input_ids=ids, pixel_values=px), fast(input_ids=ids, pixel_values=px))

    t5 = build(
        T5EncoderModel,
        T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, pad_token_id=0),
    )
    fast, cap = graphed(t5)
    ids = torch.randint(1, VOCAB, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        compare_outputs(t5(input_ids=ids, attention_mask=mask), fast(input_ids=ids, attention_mask=mask))
        emb = t5.shared(ids)
        compare_outputs(t5(inputs_embeds=emb), fast(inputs_embeds=emb))
    assert cap.captures == 2


# -------------------------------------------------------------------------------------------------- real CUDA graphs


def _cuda_text(dtype=torch.float32):
    model = build(CLIPTextModelWithProjection, clip_config(layers=2).text_config).to("cuda", dtype)
    return model, fastenc.optimize(model, cuda_graphs=True), fastenc.optimize(model)


@cuda
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_cuda_clip_text_parity(batch):
    model, fast, ref = _cuda_text()
    inputs = clip_inputs(model.config, batch, device="cuda")
    with torch.inference_mode():
        for _ in range(3):  # capture, then replays
            got = fast(**inputs)
            compare_outputs(ref(**inputs), got)
            compare_outputs(model(**inputs), got)
    assert len(fast._fastenc_graphs.graphs) == 1


@cuda
def test_cuda_replays_follow_new_inputs_and_two_shapes():
    model, fast, ref = _cuda_text()
    with torch.inference_mode():
        outs = []
        for seed, batch, seq in ((1, 2, 77), (2, 2, 77), (3, 1, 20), (4, 2, 77)):
            inputs = clip_inputs(model.config, batch, device="cuda", seq=seq, seed=seed)
            outs.append((fast(**inputs), ref(**inputs)))
        for got, expect in outs:  # copies: earlier outputs not overwritten by later replays
            compare_outputs(expect, got)
    assert len(fast._fastenc_graphs.graphs) == 2


@cuda
def test_cuda_eviction_and_static_outputs():
    model = build(CLIPTextModelWithProjection, clip_config(layers=1).text_config).cuda()
    fast = fastenc.optimize(model, cuda_graphs=GraphConfig(max_graphs=1, outputs="static"))
    ref = fastenc.optimize(model)
    with torch.inference_mode(), fastenc.trace() as t:
        for seq in (10, 11, 10):
            inputs = clip_inputs(model.config, 2, device="cuda", seq=seq)
            compare_outputs(ref(**inputs), fast(**inputs))
        a, b = (clip_inputs(model.config, 2, device="cuda", seq=10, seed=s) for s in (1, 2))
        first = fast(**a)
        compare_outputs(ref(**a), first)
        fast(**b)
        compare_outputs(ref(**b), first)  # static views: overwritten by the next replay
    assert len(fast._fastenc_graphs.graphs) == 1 and t.counts["cuda_graph.evict"] == 2


@cuda
def test_cuda_vision_and_t5():
    model = build(CLIPVisionModelWithProjection, clip_config(layers=2).vision_config).cuda()
    fast, ref = fastenc.optimize(model, cuda_graphs=True), fastenc.optimize(model)
    px = torch.randn(3, 3, 16, 16, device="cuda")
    with torch.inference_mode():
        for _ in range(2):
            compare_outputs(ref(pixel_values=px), fast(pixel_values=px))
            compare_outputs(model(pixel_values=px), fast(pixel_values=px))
    assert len(fast._fastenc_graphs.graphs) == 1
    t5 = build(
        T5EncoderModel,
        T5Config(vocab_size=VOCAB, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2, pad_token_id=0),
    ).cuda()
    fast, ref = fastenc.optimize(t5, cuda_graphs=True), fastenc.optimize(t5)
    ids = torch.randint(1, VOCAB, (3, 40), device="cuda")
    with torch.inference_mode():
        for _ in range(2):
            compare_outputs(ref(input_ids=ids), fast(input_ids=ids))
            compare_outputs(t5(input_ids=ids), fast(input_ids=ids), dict(atol=1e-4, rtol=1e-3))
    assert len(fast._fastenc_graphs.graphs) == 1  # served by a graph, not by a fall-back


@cuda
def test_cuda_weight_update_recaptures():
    """A real graph reads the fused QKV weight cached at capture: an in-place q_proj update must drop the graph."""
    model, fast, ref = _cuda_text()
    inputs = clip_inputs(model.config, 2, device="cuda")
    with torch.inference_mode():
        fast(**inputs)
        fast(**inputs)
    with torch.no_grad():
        model.text_model.encoder.layers[0].self_attn.q_proj.weight.mul_(2.0)
    with torch.inference_mode(), fastenc.trace() as t:
        got = fast(**inputs)
        compare_outputs(ref(**inputs), got)
    assert t.counts["cuda_graph.invalidate"] == 1 and t.counts["cuda_graph.capture"] == 1

"""torch.library registration: opcheck for every Triton kernel op, torch.compile(fullgraph=True) and torch.export of
optimized towers on the torch and Triton backends (the Triton kernels run through the CPU interpreter here)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPModel, SiglipConfig, SiglipModel, T5Config, T5EncoderModel

import fastenc
from fastenc.models.configs import clip_config
from fastenc.ops import _library
from fastenc.ops.reference import relative_position_buckets
from tests.utils import FP32, assert_close

# opcheck's whole battery, named so a torch release that adds a test does not silently change what runs here
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _op(name):
    _library.register_triton_ops()
    return getattr(torch.ops.fastenc, name).default


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton ops need CUDA tensors off the interpreter


def _leaf(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_(grad)


def test_every_triton_kernel_is_registered():
    names = _library.register_triton_ops()
    assert set(names) == set(_library.TRITON_OPS)
    for name in names:
        assert hasattr(torch.ops.fastenc, name), name


@pytest.mark.parametrize(
    "case",
    ["plain", "causal_kpm", "bias", "rel_bias"],
)
def test_opcheck_attention(case):
    b, h, s, d = 2, 2, 5, 8
    q, k, v = (_leaf(b, h, s, d) for _ in range(3))
    kpm = bias = table = lut = None
    causal = False
    if case == "causal_kpm":
        causal = True
        kpm = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool, device=DEVICE)
    if case == "bias":
        bias = _leaf(1, h, s, s)
    if case == "rel_bias":
        table = _leaf(8, h)
        lut = relative_position_buckets(s, s, num_buckets=8, max_distance=20, device=DEVICE)
    torch.library.opcheck(_op("attention"), (q, k, v, kpm, bias, table, lut, causal, d**-0.5), test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_norms(residual, dtype):
    x = _leaf(3, 7, 24, dtype=dtype)
    r = _leaf(3, 7, 24, dtype=dtype) if residual else None
    w, bias = _leaf(24), _leaf(24)
    torch.library.opcheck(_op("layer_norm"), (x, w, bias, r, 1e-5), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(_op("rms_norm"), (x, w.to(dtype), r, 1e-6), test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu_tanh"])
def test_opcheck_activations(activation):
    x, bias = _leaf(4, 3, 40), _leaf(40)
    torch.library.opcheck(_op("bias_activation"), (x, bias, activation), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(_op("bias_activation"), (x, None, activation), test_utils=OPCHECK_TESTS)
    gu = _leaf(4, 3, 80)
    gate, up = gu[..., :40], gu[..., 40:]  # the strided halves of T5's fused wi_0 / wi_1 GEMM
    torch.library.opcheck(_op("gated_activation"), (gate, up, activation), test_utils=OPCHECK_TESTS)


def test_opcheck_cosine_and_contrastive():
    a, b = _leaf(9, 16), _leaf(13, 16)
    torch.library.opcheck(_op("cosine_similarity_matrix"), (a, b, 2.0, False), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(_op("cosine_similarity_matrix"), (a, b, 1.0, True), test_utils=OPCHECK_TESTS)
    img, txt = torch.randn(6, 16, device=DEVICE), torch.randn(6, 16, device=DEVICE)
    stats, grads = _op("contrastive_row_stats"), _op("contrastive_row_grads")
    for kind in ("clip", "siglip"):
        torch.library.opcheck(stats, (kind, img, txt, 3.0, -1.0, 0), test_utils=OPCHECK_TESTS)
    lse_r = stats("clip", img, txt, 3.0, 0.0, 0)
    lse_c = stats("clip", txt, img, 3.0, 0.0, 0)
    torch.library.opcheck(grads, ("clip", img, txt, lse_r, lse_c, 3.0, 0.0, 0, 1 / 12), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(grads, ("siglip", img, txt, None, None, 3.0, -1.0, 0, 1 / 6), test_utils=OPCHECK_TESTS)


def test_registered_backward_matches_reference_gradients():
    """The op's autograd formula (vjp of the reference) against autograd through the reference itself."""
    from fastenc.ops.reference import layer_norm_reference

    x, r, w, b = _leaf(2, 5, 32), _leaf(2, 5, 32), _leaf(32), _leaf(32)
    y, s = fastenc.ops.layer_norm(x, w, b, 1e-5, residual=r, backend="triton", strict=True)
    (y * torch.arange(32.0, device=DEVICE)).sum().backward(inputs=[x, r, w, b])
    got = [t.grad.clone() for t in (x, r, w, b)]
    for t in (x, r, w, b):
        t.grad = None
    y_ref, _ = layer_norm_reference(x, w, b, r, eps=1e-5)
    (y_ref * torch.arange(32.0, device=DEVICE)).sum().backward(inputs=[x, r, w, b])
    for name, g, t in zip("xrwb", got, (x, r, w, b), strict=True):
        assert_close(g, t.grad, atol=1e-6, rtol=1e-5, name=f"d{name}")


# ------------------------------------------------------------------------------------------ whole towers


class _GraphRecorder:
    """A torch.compile backend that keeps the FX graphs it is given and runs them eagerly."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def targets(self) -> list[str]:
        return [str(n.target) for gm in self.graphs for n in gm.graph.nodes if n.op == "call_function"]


def _clip(layers=1):
    return CLIPModel(clip_config("tiny", layers=layers)).to(DEVICE).eval()


def _clip_inputs(model, batch=2):
    from fastenc.parity import clip_inputs

    return clip_inputs(model.config, batch, device=DEVICE)


def _t5():
    cfg = T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"
    )
    return T5EncoderModel(cfg).to(DEVICE).eval()


def _t5_inputs(batch=2, seq=9):
    ids = torch.randint(0, 64, (batch, seq), device=DEVICE)
    mask = torch.ones(batch, seq, dtype=torch.long, device=DEVICE)
    mask[-1, seq // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _siglip():
    cfg = SiglipConfig(
        text_config=dict(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=16,
            patch_size=8,
        ),
    )  # fmt: skip
    return SiglipModel(cfg).to(DEVICE).eval()


def _siglip_inputs():
    return {
        "input_ids": torch.randint(0, 64, (2, 16), device=DEVICE),
        "pixel_values": torch.randn(2, 3, 16, 16, device=DEVICE),
    }


TOWERS = {
    "clip": (_clip, _clip_inputs, "text_embeds"),
    "siglip": (_siglip, lambda m: _siglip_inputs(), "image_embeds"),
    "t5": (_t5, lambda m: _t5_inputs(), "last_hidden_state"),
}
# fastenc ops each tower's graph must hold on the Triton backend (T5 has no bias+activation of its own: gated)
EXPECTED_OPS = {
    "clip": {"attention", "layer_norm", "bias_activation"},
    "siglip": {"attention", "layer_norm", "bias_activation"},
    "t5": {"attention", "rms_norm", "gated_activation"},
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_compile_fullgraph(tower, backend):
    make, inputs_of, field = TOWERS[tower]
    model = make()
    fast = fastenc.optimize(model, backend=backend, strict=True)
    inputs = inputs_of(model)
    rec = _GraphRecorder()
    compiled = torch.compile(fast, fullgraph=True, backend=rec)
    with torch.no_grad():
        want = model(**inputs)
        got = compiled(**inputs)
    assert len(rec.graphs) == 1, f"{len(rec.graphs)} graphs: fullgraph must give exactly one"
    assert_close(got[field], want[field], **FP32, name=field)
    ops = {t.split(".")[1] for t in rec.targets() if t.startswith("fastenc.")}
    if backend == "triton":
        assert EXPECTED_OPS[tower] <= ops, f"graph holds fastenc ops {sorted(ops)}"
    else:
        assert not ops, f"the torch backend is plain aten ops, got {sorted(ops)}"


def test_compile_training_backward_matches_eager():
    """aot_eager traces the registered backward of every op: gradients equal the uncompiled fastenc model's."""
    model = _clip()
    inputs = _clip_inputs(model)
    fast = fastenc.optimize(model, backend="triton", strict=True)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    params = [p for p in model.parameters()]
    out = compiled(**inputs)
    (out.text_embeds.square().sum() + out.image_embeds.sum()).backward()
    got = [p.grad.clone() if p.grad is not None else None for p in params]
    model.zero_grad(set_to_none=True)
    out = fast(**inputs)
    (out.text_embeds.square().sum() + out.image_embeds.sum()).backward()
    n_checked = 0
    for (name, p), g in zip(model.named_parameters(), got, strict=True):
        if p.grad is None:  # unused by the loss (logit_scale): AOT autograd may hand back zeros instead of None
            assert g is None or not g.any(), name
            continue
        assert_close(g, p.grad, atol=1e-5, rtol=1e-4, name=name)
        n_checked += 1
    assert n_checked > 20


@pytest.mark.parametrize("tower", ["clip", "t5"])
def test_export_captures_fastenc_ops(tower):
    make, inputs_of, field = TOWERS[tower]
    model = make()
    fast = fastenc.optimize(model, backend="triton", strict=True)
    inputs = inputs_of(model)
    ep = torch.export.export(fast, (), dict(inputs))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    ops = {t.split(".")[1] for t in targets if t.startswith("fastenc.")}
    assert EXPECTED_OPS[tower] <= ops, ops
    with torch.no_grad():
        want = model(**inputs)
        got = ep.module()(**inputs)
    assert_close(got[field], want[field], **FP32, name=field)


def test_inductor_compiles_torch_backend():
    """The default compiler (Inductor, C++ codegen on CPU) on the torch backend, a text tower at 77 tokens."""
    model = _clip()
    inputs = _clip_inputs(model, batch=1)
    fast = fastenc.optimize(model, backend="torch")
    compiled = torch.compile(fast.get_text_features, fullgraph=True)
    with torch.no_grad():
        want = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        got = compiled(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    want = getattr(want, "pooler_output", want)
    got = getattr(got, "pooler_output", got)
    assert_close(got, want, **FP32, name="text features")


def test_export_dynamic_batch_and_sequence():
    """One exported program (Triton ops inside) serves batch and sequence sizes other than the example's."""
    from torch.export import Dim
    from transformers import CLIPTextModelWithProjection

    cfg = clip_config("tiny", layers=1).text_config
    model = CLIPTextModelWithProjection(cfg).to(DEVICE).eval()
    fast = fastenc.optimize(model, backend="triton", strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 7), device=DEVICE)
    batch, seq = Dim("batch", min=1, max=256), Dim("seq", min=2, max=cfg.max_position_embeddings)
    dims = {0: batch, 1: seq}
    ep = torch.export.export(
        fast,
        (),
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        dynamic_shapes={"input_ids": dims, "attention_mask": dims},
    )
    for b, s in ((3, 11), (1, cfg.max_position_embeddings)):
        ids = torch.randint(0, cfg.vocab_size, (b, s), device=DEVICE)
        mask = torch.ones_like(ids)
        mask[0, s // 2 :] = 0
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask)
            got = ep.module()(input_ids=ids, attention_mask=mask)
        assert_close(got["text_embeds"], want.text_embeds, **FP32, name=f"text_embeds b={b} s={s}")
        assert_close(got["last_hidden_state"], want.last_hidden_state, **FP32, name=f"last_hidden_state b={b} s={s}")

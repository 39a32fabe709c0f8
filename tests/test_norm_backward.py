"""Fused LayerNorm / RMSNorm backward (kernels/norm.py "Backward", fastenc::layer_norm_backward / rms_norm_backward)
against the reference's gradients in float64.

Gradients go through the public ops (backend="triton", strict=True) and autograd, so they exercise the registered
autograd formula of fastenc::layer_norm / rms_norm: dx, dresidual, dweight, dbias, and the gradient of the returned
x + residual flowing into dx and dresidual. fp32 is held to a tight bound; fp16 / bf16 to the flash-attention rule
(error vs float64 at most 2x PyTorch's own error in that dtype, + a small atol). CPU runs use TRITON_INTERPRET=1.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from utils import assert_close, assert_error_within, count_backward_launches, max_abs_err

import fastenc
from fastenc.kernels import norm as kernels
from fastenc.ops import _library
from fastenc.ops.reference import rms_norm_reference

# Odd widths (1, 7, 33, 4097), one row, a row count that splits unevenly over the backward's programs.
SHAPES = [(2, 13, 33), (1, 1, 4097), (5, 7), (6, 1), (2, 19, 80)]
LOW_SHAPES = [(2, 9, 33), (1, 3, 4097), (26, 80)]
LOW = [torch.float16, torch.bfloat16]


@pytest.fixture
def launches(monkeypatch):
    return count_backward_launches(monkeypatch, kernels, ("layer_norm", "rms_norm"))


def _inputs(shape, dtype, residual, bias=True, weight_dtype=None, device="cpu"):
    n = shape[-1]
    x = torch.randn(shape, device=device).to(dtype)
    r = torch.randn(shape, device=device).to(dtype) if residual else None
    w = (1.0 + 0.5 * torch.randn(n, device=device)).to(weight_dtype or dtype)
    b = (0.5 * torch.randn(n, device=device)).to(weight_dtype or dtype) if bias else None
    return x, r, w, b


def _grads(kind, x, r, w, b, eps, gy, gs, *, backend="triton"):
    """Input gradients of sum(y * gy) (+ sum(s * gs)) through fastenc.ops.<kind>, for the leaves x, r, w, b (None
    where absent)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, r, w, b)]
    xl, rl, wl, bl = leaves
    if kind == "layer_norm":
        out = fastenc.ops.layer_norm(xl, wl, bl, eps, rl, backend=backend, strict=backend != "torch")
    else:
        out = fastenc.ops.rms_norm(xl, wl, eps, rl, backend=backend, strict=backend != "torch")
    y, s = out if rl is not None else (out, None)
    loss = (y.float() * gy).sum() + ((s.float() * gs).sum() if gs is not None else 0)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(loss, present))
    return [next(grads) if t is not None else None for t in leaves]


def _exact(kind, s, w, b, eps):
    """The op's formula with no intermediate rounding (run in float64 for the reference)."""
    if kind == "layer_norm":
        return F.layer_norm(s, (s.shape[-1],), w, b, eps)
    return w * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps))


def _torch_low(kind, s, w, b, eps):
    """PyTorch's own computation in the inputs' dtypes: F.layer_norm, or T5LayerNorm's (fp32 variance, the normed
    value cast to a half weight's dtype), as `rms_norm_reference` runs it."""
    if kind == "layer_norm":
        return F.layer_norm(s, (s.shape[-1],), w, b, eps)
    return rms_norm_reference(s, w, eps=eps)


def _reference_grads(kind, x, r, w, b, eps, gy, gs, fn=None):
    """[ds, ds (residual), dw, db] of sum(fn(s, w, b) * gy) + sum(s * gs) by autograd, at s = x + residual as the
    forward rounds it in x's dtype. fn=None: the exact formula in float64 (the reference); otherwise fn on the
    tensors as given (a baseline). dx == dresidual == d/ds."""
    s = x if r is None else x + r
    if fn is None:
        fn, s, w, b = _exact, s.double(), w.double(), None if b is None else b.double()
    s, wl = s.detach().requires_grad_(), w.detach().requires_grad_()
    bl = b.detach().requires_grad_() if b is not None else None
    y = fn(kind, s, wl, bl, eps)
    loss = (y.double() * gy.double()).sum() + ((s.double() * gs.double()).sum() if gs is not None else 0)
    g = torch.autograd.grad(loss, [s, wl] + ([bl] if bl is not None else []))
    return [g[0], g[0] if r is not None else None, g[1], g[2] if bl is not None else None]


NAMES = ("dx", "dresidual", "dweight", "dbias")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "kind, residual, bias",
    [("layer_norm", False, True), ("layer_norm", True, True), ("layer_norm", True, False)]
    + [("rms_norm", False, False), ("rms_norm", True, False)],
)
def test_backward_fp32(kind, shape, residual, bias, launches, device):
    x, r, w, b = _inputs(shape, torch.float32, residual, bias=bias, device=device)
    gy = torch.randn(shape, device=device)
    gs = torch.randn(shape, device=device) if residual else None
    got = _grads(kind, x, r, w, b, 1e-5, gy, gs)
    assert launches[kind] == 1, launches
    want = _reference_grads(kind, x, r, w, b, 1e-5, gy, gs)
    rows = x.numel() // shape[-1]
    for name, g, e in zip(NAMES, got, want, strict=True):
        assert (g is None) == (e is None), name
        if g is not None:
            assert g.dtype == torch.float32
            # weight gradients sum over rows: fp32 rounding grows with the row count
            atol = 2e-5 * max(1.0, rows**0.5) if name in ("dweight", "dbias") else 2e-5
            assert_close(g, e, atol=atol, rtol=1e-5, name=f"{kind} {name}")
    if residual:
        assert torch.equal(got[0], got[1]) and got[0].data_ptr() != got[1].data_ptr(), "dx == dresidual, own tensors"


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("weight_dtype", ["x", torch.float32])
@pytest.mark.parametrize("shape", LOW_SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_backward_low_precision(kind, dtype, weight_dtype, shape, residual, launches, device):
    """2x PyTorch's own low-precision error against float64, for every gradient; dtypes as the inputs'."""
    wd = dtype if weight_dtype == "x" else weight_dtype
    x, r, w, b = _inputs(shape, dtype, residual, bias=kind == "layer_norm", weight_dtype=wd, device=device)
    y_dtype = dtype
    gy = torch.randn(shape, device=device).to(y_dtype)
    gs = torch.randn(shape, device=device).to(dtype) if residual else None
    got = _grads(kind, x, r, w, b, 1e-5, gy.float(), None if gs is None else gs.float())
    assert launches[kind] == 1
    want = _reference_grads(kind, x, r, w, b, 1e-5, gy, gs)
    # PyTorch's own computation in the low dtype: the formula with every tensor in `dtype` (T5LayerNorm-style fp32
    # statistics for rms_norm, as its reference does), differentiated by autograd
    base = _reference_grads(kind, x, r, w.to(dtype), None if b is None else b.to(dtype), 1e-5, gy, gs, _torch_low)
    for name, g, e, bl, t in zip(NAMES, got, want, base, (x, r, w, b), strict=True):
        if g is None:
            assert e is None, name
            continue
        assert g.dtype == t.dtype, f"{name}: {g.dtype} != input dtype {t.dtype}"
        assert_error_within(g, bl, e, factor=2, atol=1e-3 * max(1.0, e.abs().max().item()), name=f"{kind} {name}")


@pytest.mark.parametrize("half", LOW)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_half_weight_on_fp32_input(half, residual, launches, device):
    """T5 in fp16 / bf16: the residual stream in fp32, the weight half. y (and dy) is in the weight's dtype; dweight
    sums dy * xhat rounded to that dtype (what the forward multiplied), dx is fp32."""
    shape = (2, 9, 33)
    x, r, w, _ = _inputs(shape, torch.float32, residual, bias=False, weight_dtype=half, device=device)
    gy = torch.randn(shape, device=device).to(half)
    gs = torch.randn(shape, device=device) if residual else None
    got = _grads("rms_norm", x, r, w, None, 1e-6, gy.float(), gs)
    assert launches["rms_norm"] == 1
    want = _reference_grads("rms_norm", x, r, w, None, 1e-6, gy, gs)
    base = _reference_grads("rms_norm", x, r, w, None, 1e-6, gy, gs, _torch_low)  # the reference, by autograd
    assert got[0].dtype == torch.float32 and got[2].dtype == half
    for name, g, e, bl in zip(NAMES[:3], got[:3], want[:3], base[:3], strict=True):
        if g is not None:
            assert_error_within(g, bl, e, factor=2, atol=1e-5 * max(1.0, e.abs().max().item()), name=name)


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_partial_gradients(kind, launches, device):
    """Frozen weights, gradient for one of x / residual only, only the s output used, only y used."""
    shape = (3, 5, 33)
    x, r, w, b = _inputs(shape, torch.float32, True, bias=kind == "layer_norm", device=device)
    gy, gs = torch.randn(shape, device=device), torch.randn(shape, device=device)
    want = _reference_grads(kind, x, r, w, b, 1e-5, gy, gs)
    want_y_only = _reference_grads(kind, x, r, w, b, 1e-5, gy, None)

    def run(req, use_y=True, use_s=True):
        leaves = [
            t.detach().clone().requires_grad_(q) if t is not None else None
            for t, q in zip((x, r, w, b), req, strict=True)
        ]
        xl, rl, wl, bl = leaves
        if kind == "layer_norm":
            y, s = fastenc.ops.layer_norm(xl, wl, bl, 1e-5, rl, backend="triton", strict=True)
        else:
            y, s = fastenc.ops.rms_norm(xl, wl, 1e-5, rl, backend="triton", strict=True)
        loss = ((y * gy).sum() if use_y else 0) + ((s * gs).sum() if use_s else 0)
        loss.backward()
        return [None if t is None else t.grad for t in leaves]

    g = run([True, False, False, False])  # x only: the fused kernel writes one dx
    assert_close(g[0], want[0], atol=2e-5, rtol=1e-5, name="dx alone")
    assert g[1] is None and g[2] is None
    g = run([False, True, True, False])  # residual and weight
    assert_close(g[1], want[1], atol=2e-5, rtol=1e-5, name="dresidual alone")
    assert_close(g[2], want[2], atol=1e-4, rtol=1e-5, name="dweight")
    g = run([True, True, True, True], use_s=False)  # the s output unused: no gradient to add
    assert_close(g[0], want_y_only[0], atol=2e-5, rtol=1e-5, name="dx, y only")
    assert_close(g[1], want_y_only[1], atol=2e-5, rtol=1e-5, name="dresidual, y only")
    calls = launches[kind]
    g = run([True, True, True, True], use_y=False)  # only s used: dx = dresidual = gs, no kernel, no weight grad
    assert launches[kind] == calls
    assert torch.equal(g[0], gs) and torch.equal(g[1], gs) and g[0].data_ptr() != g[1].data_ptr()
    assert g[2] is None or not g[2].any()


def test_strided_input_and_expanded_gradient(launches, device):
    """x a column slice of a wider tensor (read in place by the forward), dy an expanded (stride-0) gradient."""
    wide = torch.randn(4, 7, 50, device=device)
    w, b = torch.randn(33, device=device), torch.randn(33, device=device)
    x = wide[..., :33].detach().requires_grad_()
    assert not x.is_contiguous()
    y = fastenc.ops.layer_norm(x, w.requires_grad_(), b.requires_grad_(), 1e-5, backend="triton", strict=True)
    y.sum().backward()  # dy: ones expanded to x's shape
    want = _reference_grads("layer_norm", x.detach(), None, w.detach(), b.detach(), 1e-5, torch.ones(4, 7, 33), None)
    assert_close(x.grad, want[0], atol=2e-5, rtol=1e-5, name="dx")
    assert_close(w.grad, want[2], atol=1e-4, rtol=1e-5, name="dweight")
    assert_close(b.grad, want[3], atol=1e-4, rtol=1e-5, name="dbias")


def test_wide_rows_fall_back_to_reference_backward(launches, device):
    """Rows wider than MAX_FUSED_BWD_N: the forward is fused, the backward is the reference's vjp, warned and traced."""
    n = kernels.MAX_FUSED_BWD_N + 1
    assert kernels.norm_unsupported_reason(torch.empty(1, n)) is None  # the forward still fuses this width
    x, r, w, b = _inputs((2, n), torch.float32, True, device=device)
    gy, gs = torch.randn(2, n, device=device), torch.randn(2, n, device=device)
    with fastenc.trace() as t, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _grads("layer_norm", x, r, w, b, 1e-5, gy, gs)
    assert launches["layer_norm"] == 0
    assert [f.op for f in t.fallbacks] == ["layer_norm_backward"], t.fallbacks
    assert "MAX" not in t.fallbacks[0].reason and str(kernels.MAX_FUSED_BWD_N) in t.fallbacks[0].reason
    assert any(issubclass(c.category, fastenc.FallbackWarning) for c in caught)
    want = _reference_grads("layer_norm", x, r, w, b, 1e-5, gy, gs)
    for name, g, e in zip(NAMES, got, want, strict=True):
        assert_close(g, e, atol=2e-5, rtol=1e-5, name=name)


def test_matches_torch_backend_gradients(launches, device):
    """The Triton backend's gradients equal the torch backend's (plain aten autograd) at fp32 round-off."""
    x, r, w, b = _inputs((3, 11, 80), torch.float32, True, device=device)
    gy, gs = torch.randn(3, 11, 80, device=device), torch.randn(3, 11, 80, device=device)
    for kind in ("layer_norm", "rms_norm"):
        bb = b if kind == "layer_norm" else None
        got = _grads(kind, x, r, w, bb, 1e-6, gy, gs)
        ref = _grads(kind, x, r, w, bb, 1e-6, gy, gs, backend="torch")
        for name, g, e in zip(NAMES, got, ref, strict=True):
            if e is not None:
                assert_close(g, e, atol=3e-5, rtol=1e-5, name=f"{kind} {name}")
    assert launches == {"layer_norm": 1, "rms_norm": 1}


def test_double_backward_raises(device):
    x, _, w, b = _inputs((2, 33), torch.float32, False, device=device)
    x.requires_grad_()
    y = fastenc.ops.layer_norm(x, w, b, 1e-5, backend="triton", strict=True)
    (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(fastenc.DoubleBackwardError, match="layer_norm_backward"):
        gx.sum().backward()


# ---------------------------------------------------------------------------------------------------- torch.library

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_backward_ops(residual, dtype, device):
    _library.register_triton_ops()
    s = torch.randn(3, 5, 24, device=device, dtype=dtype)
    dy = torch.randn(3, 5, 24, device=device, dtype=dtype)
    ds = torch.randn(3, 5, 24, device=device, dtype=dtype) if residual else None
    w, b = torch.randn(24, device=device), torch.randn(24, device=device)
    ln, rms = torch.ops.fastenc.layer_norm_backward.default, torch.ops.fastenc.rms_norm_backward.default
    torch.library.opcheck(ln, (dy, ds, s, w, b, 1e-5, residual), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(ln, (dy, ds, s, w, None, 1e-5, False), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(rms, (dy, ds, s, w.to(dtype), 1e-6, residual), test_utils=OPCHECK_TESTS)


def test_opcheck_forward_ops_with_fused_backward(device):
    """opcheck of the forward ops runs their registered (fused) autograd formula with requires-grad inputs."""
    _library.register_triton_ops()
    x, r = (torch.randn(3, 7, 24, device=device, requires_grad=True) for _ in range(2))
    w, b = torch.randn(24, device=device, requires_grad=True), torch.randn(24, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastenc.layer_norm.default, (x, w, b, r, 1e-5), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(torch.ops.fastenc.rms_norm.default, (x, w, r, 1e-6), test_utils=OPCHECK_TESTS)


def test_compile_fullgraph_training_uses_fused_backward(launches, device):
    """torch.compile(fullgraph=True) with AOT autograd: one forward graph, a backward graph holding the fused
    backward ops (not the reference's aten decomposition), gradients equal to eager."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    graphs = {"fw": [], "bw": []}

    def recorder(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    def block(x, r, w, b, w2):
        y, s = fastenc.ops.layer_norm(x, w, b, 1e-5, r, backend="triton", strict=True)
        z = fastenc.ops.rms_norm(y, w2, 1e-6, backend="triton", strict=True)
        return (z * z).sum() + s.sum()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=aot_autograd(fw_compiler=recorder("fw"),
                                                                          bw_compiler=recorder("bw")))  # fmt: skip
    x, r, w, b = _inputs((2, 5, 33), torch.float32, True, device=device)
    w2 = torch.randn(33, device=device)
    leaves = [t.requires_grad_() for t in (x, r, w, b, w2)]
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(block(*leaves), leaves)
    for g, e, name in zip(got, want, ("x", "residual", "weight", "bias", "weight2"), strict=True):
        assert_close(g, e, atol=1e-5, rtol=1e-5, name=f"compiled d{name}")
    assert len(graphs["fw"]) == 1 and len(graphs["bw"]) == 1
    targets = {str(n.target) for n in graphs["bw"][0].graph.nodes if n.op == "call_function"}
    assert {"fastenc.layer_norm_backward.default", "fastenc.rms_norm_backward.default"} <= targets, targets
    assert "aten.native_layer_norm_backward.default" not in targets


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_cuda_namespace_registration_logic(kind, launches, device):
    """register_cuda_autograd gives fastenc_cuda::<norm> the same fused backward (FUSED_AUTOGRAD[kind]); tested here
    on a stand-in op with the CUDA op's schema whose forward is the reference, so it runs without the extension."""
    name = f"fastenc_h2test::{kind}"
    ref = _library._references()[kind]
    if kind == "layer_norm":

        def fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                eps: float) -> list[torch.Tensor]:  # fmt: skip
            out = ref(x, weight, bias, residual, eps)
            return [out.clone()] if residual is None else [t.clone() for t in out]
    else:

        def fwd(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float) -> list[torch.Tensor]:
            out = ref(x, weight, residual, eps)
            return [out.clone()] if residual is None else [t.clone() for t in out]

    if not hasattr(torch.ops.fastenc_h2test, kind):
        op = torch.library.custom_op(name, fwd, mutates_args=())
        _library.FUSED_AUTOGRAD[kind](name)
    op = getattr(torch.ops.fastenc_h2test, kind).default
    x, r, w, b = _inputs((3, 7, 33), torch.float32, True, device=device)
    gy, gs = torch.randn(3, 7, 33, device=device), torch.randn(3, 7, 33, device=device)
    leaves = [t.requires_grad_() for t in (x, r, w, b)]
    args = (x, w, b, r, 1e-5) if kind == "layer_norm" else (x, w, r, 1e-5)
    y, s = op(*args)
    wrt = leaves if kind == "layer_norm" else leaves[:3]
    got = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), wrt)
    assert launches[kind] == 1
    want = _reference_grads(kind, x.detach(), r.detach(), w.detach(), b.detach() if kind == "layer_norm" else None,
                            1e-5, gy, gs)  # fmt: skip
    for name, g, e in zip(NAMES, got, want, strict=False):
        assert_close(g, e, atol=2e-5, rtol=1e-5, name=name)
    assert max_abs_err(got[0], got[1]) == 0.0


@pytest.mark.parametrize("tower", ["clip", "t5"])
def test_tower_gradients_match_transformers(tower, launches, device):
    """A tiny optimized tower trained on the Triton backend: every parameter gradient equals transformers' own (the
    fused norm and activation backwards run in every layer; CLIP: LayerNorm + quick_gelu, T5: RMSNorm + gated-gelu)."""
    from transformers import CLIPModel, T5Config, T5EncoderModel

    from fastenc.models.configs import clip_config
    from fastenc.parity import clip_inputs

    if tower == "clip":
        model = CLIPModel(clip_config("tiny", layers=1)).to(device).eval()
        inputs = clip_inputs(model.config, 2, device=device)

        def loss_of(out):
            return out.text_embeds.square().sum() + out.image_embeds.sum()
    else:
        cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                       feed_forward_proj="gated-gelu")  # fmt: skip
        model = T5EncoderModel(cfg).to(device).eval()
        inputs = {"input_ids": torch.randint(0, 64, (2, 9), device=device)}

        def loss_of(out):
            return out.last_hidden_state.square().sum()

    fast = fastenc.optimize(model, backend="triton", strict=True)
    params = dict(model.named_parameters())
    loss_of(fast(**inputs)).backward()
    got = {k: None if p.grad is None else p.grad.clone() for k, p in params.items()}
    model.zero_grad(set_to_none=True)
    loss_of(model(**inputs)).backward()
    norm = "layer_norm" if tower == "clip" else "rms_norm"
    assert launches[norm] > 0, launches
    checked = 0
    for name, p in params.items():
        if p.grad is None:
            assert got[name] is None or not got[name].any(), name
            continue
        assert_close(got[name], p.grad, atol=1e-5, rtol=1e-4, name=name)
        checked += 1
    assert checked > 10

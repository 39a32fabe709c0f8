"""Fused bias + activation and gated activation backward (kernels/activation.py "Backward",
fastenc::bias_activation_backward / gated_activation_backward) against the reference's gradients in float64.

Gradients go through the public ops (backend="triton", strict=True) and autograd: dx and dbias of act(x + bias), dgate
and dup of act(gate) * up, for every activation the forward supports, with and without bias, odd widths. fp32 is held
tight; fp16 / bf16 to the flash-attention rule (error vs float64 at most 2x PyTorch's own error in that dtype).
CPU runs use TRITON_INTERPRET=1, so shapes stay small.
"""

import warnings

import pytest
import torch
from utils import assert_close, assert_error_within, count_backward_launches

import fastenc
from fastenc.kernels import activation as kernels
from fastenc.ops import _library
from fastenc.ops.reference import ACTIVATION_FNS

# Under the interpreter numpy warns when exp(-x) or x^3 overflows to inf in the far tails (results still exact).
# gelu_tanh's guarded 0 * inf (x^3 overflows where p (1 - p) == 0) is computed, then discarded by tl.where.
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered in:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning"),
]

ACTIVATIONS = list(kernels.ACTIVATIONS)
# Odd widths (1, 7, 33, 4097: five column blocks), rows that need several row blocks per program with a bias.
SHAPES = [(3, 7, 33), (26, 1), (2, 4097), (4, 7), (40, 80)]
LOW = [torch.float16, torch.bfloat16]


@pytest.fixture
def launches(monkeypatch):
    return count_backward_launches(monkeypatch, kernels, ("bias_activation", "gated_activation"))


def _x(shape, dtype, device):
    return (3.0 * torch.randn(shape, device=device)).to(dtype)  # spans both tails of every activation


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def _fast_bias_grads(x, b, activation, gy):
    xl, bl = _leaves(x, b)
    y = fastenc.ops.bias_activation(xl, bl, activation, backend="triton", strict=True)
    return list(torch.autograd.grad((y.float() * gy).sum(), [t for t in (xl, bl) if t is not None])) + (
        [None] if b is None else []
    )


def _bias_grads(x, b, activation, gy, dtype=None):
    """Autograd through act(x + bias) with every tensor in `dtype` (float64: the reference; None: as given, i.e.
    PyTorch's own computation in the inputs' dtype)."""
    xl, bl = _leaves(*(t if t is None or dtype is None else t.to(dtype) for t in (x, b)))
    h = xl if bl is None else xl + bl.to(xl.dtype)
    y = ACTIVATION_FNS[activation](h)
    g = torch.autograd.grad((y.double() * gy.double()).sum(), [t for t in (xl, bl) if t is not None])
    return list(g) + ([None] if b is None else [])


def _fast_gated_grads(gate, up, activation, gy):
    gl, ul = _leaves(gate, up)
    y = fastenc.ops.gated_activation(gl, ul, activation, backend="triton", strict=True)
    return list(torch.autograd.grad((y.float() * gy).sum(), [gl, ul]))


def _gated_grads(gate, up, activation, gy, dtype=None):
    gl, ul = _leaves(*(t if dtype is None else t.to(dtype) for t in (gate, up)))
    y = ACTIVATION_FNS[activation](gl) * ul
    return list(torch.autograd.grad((y.double() * gy.double()).sum(), [gl, ul]))


# ---------------------------------------------------------------------------------------------------- bias_activation


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_bias_activation_backward_fp32(activation, shape, bias, launches, device):
    x = _x(shape, torch.float32, device)
    b = torch.randn(shape[-1], device=device) if bias else None
    gy = torch.randn(shape, device=device)
    got = _fast_bias_grads(x, b, activation, gy)
    assert launches["bias_activation"] == 1
    want = _bias_grads(x, b, activation, gy, torch.float64)
    assert got[0].dtype == torch.float32
    assert_close(got[0], want[0], atol=2e-6, rtol=2e-6, name=f"{activation} dx")
    if bias:
        rows = x.numel() // shape[-1]
        assert_close(got[1], want[1], atol=2e-6 * rows**0.5, rtol=2e-6, name=f"{activation} dbias")
    else:
        assert got[1] is None


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias_dtype", ["x", torch.float32])
def test_bias_activation_backward_low_precision(dtype, activation, bias_dtype, launches, device):
    """2x PyTorch's own error (the activation's autograd in the low dtype) against float64; grads in input dtypes."""
    shape = (3, 7, 33)
    x = _x(shape, dtype, device)
    b = torch.randn(33, device=device).to(dtype if bias_dtype == "x" else bias_dtype)
    gy = torch.randn(shape, device=device).to(dtype)
    got = _fast_bias_grads(x, b, activation, gy.float())
    want = _bias_grads(x, b, activation, gy, torch.float64)
    base = _bias_grads(x, b.to(dtype), activation, gy)  # PyTorch in the low dtype
    assert got[0].dtype == dtype and got[1].dtype == b.dtype
    for name, g, e, bl in zip(("dx", "dbias"), got, want, base, strict=True):
        assert_error_within(g, bl, e, factor=2, atol=1e-3, name=f"{activation} {name}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_extreme_values(activation, launches, device):
    """Far tails: the derivative is exactly 1 or 0 (float64 autograd agrees); no NaN from 0 * inf in the kernel."""
    x = torch.tensor([[-1e4, -100.0, -30.0, -0.0, 0.0, 1e-30, 30.0, 100.0, 1e4, 3e38, -3e38]], device=device)
    gy = torch.ones_like(x)
    got = _fast_bias_grads(x, None, activation, gy)[0]
    assert torch.isfinite(got).all(), got
    want = _bias_grads(x, None, activation, gy, torch.float64)[0]
    assert_close(got, want, atol=1e-6, rtol=1e-6, name=activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_semantics(activation, device):
    """NaN input or NaN incoming gradient: NaN, except relu, whose gradient is 0 wherever h > 0 fails, whatever dy
    holds there (torch's threshold_backward)."""
    x = torch.tensor([[float("nan"), 1.0, -1.0, -2.0]], device=device)
    gy = torch.tensor([[1.0, 1.0, 1.0, float("nan")]], device=device)
    got = _fast_bias_grads(x, None, activation, gy)[0]
    want = _bias_grads(x, None, activation, gy)[0]  # torch's own fp32 autograd
    assert torch.equal(got.isnan(), want.isnan()), (got, want)
    assert_close(got[:, 1:3], want[:, 1:3], atol=1e-6, rtol=1e-6, name=activation)


def test_frozen_bias_and_frozen_input(launches, device):
    x, b = _x((5, 33), torch.float32, device), torch.randn(33, device=device)
    gy = torch.randn(5, 33, device=device)
    want = _bias_grads(x, b, "gelu", gy, torch.float64)
    xl = x.clone().requires_grad_()
    (fastenc.ops.bias_activation(xl, b, "gelu", backend="triton", strict=True) * gy).sum().backward()
    assert_close(xl.grad, want[0], atol=2e-6, rtol=2e-6, name="dx, frozen bias")
    bl = b.clone().requires_grad_()
    (fastenc.ops.bias_activation(x, bl, "gelu", backend="triton", strict=True) * gy).sum().backward()
    assert_close(bl.grad, want[1], atol=1e-5, rtol=2e-6, name="dbias, frozen x")
    assert launches["bias_activation"] == 2


def test_fall_back_to_reference_where_triton_cannot_run(monkeypatch, launches, device):
    """If the backward finds Triton unable to run, it differentiates the reference, warned and traced."""
    from fastenc.core import dispatch as _dispatch

    x, b = _x((4, 33), torch.float32, device), torch.randn(33, device=device)
    gy = torch.randn(4, 33, device=device)
    xl, bl = _leaves(x, b)
    y = fastenc.ops.bias_activation(xl, bl, "quick_gelu", backend="triton", strict=True)  # forward on Triton
    monkeypatch.setattr(_dispatch, "_triton_can_run", lambda device: "triton is not installed (test)")
    with fastenc.trace() as t, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.autograd.grad((y * gy).sum(), [xl, bl])
    assert launches["bias_activation"] == 0
    assert [(f.op, f.ran) for f in t.fallbacks] == [("bias_activation_backward", "torch")]
    assert any(issubclass(c.category, fastenc.FallbackWarning) for c in caught)
    want = _bias_grads(x, b, "quick_gelu", gy, torch.float64)
    for name, g, e in zip(("dx", "dbias"), got, want, strict=True):
        assert_close(g, e, atol=1e-5, rtol=2e-6, name=name)


def test_double_backward_raises(device):
    x = _x((2, 33), torch.float32, device).requires_grad_()
    y = fastenc.ops.bias_activation(x, None, "gelu", backend="triton", strict=True)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(fastenc.DoubleBackwardError, match="bias_activation_backward"):
        gx.sum().backward()


# ---------------------------------------------------------------------------------------------------- gated_activation


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(3, 7, 33), (26, 1), (2, 4097)])
def test_gated_activation_backward_fp32(activation, shape, launches, device):
    """gate and up are the strided halves of one (..., 2N) tensor, as T5's fused wi_0 / wi_1 GEMM gives them."""
    n = shape[-1]
    gu = _x((*shape[:-1], 2 * n), torch.float32, device)
    gate, up = gu[..., :n], gu[..., n:]
    gy = torch.randn(shape, device=device)
    gl, ul = gate.detach().requires_grad_(), up.detach().requires_grad_()  # views stay strided: read in place
    y = fastenc.ops.gated_activation(gl, ul, activation, backend="triton", strict=True)
    got = torch.autograd.grad((y * gy).sum(), [gl, ul])
    assert launches["gated_activation"] == 1
    want = _gated_grads(gate, up, activation, gy, torch.float64)
    for name, g, e in zip(("dgate", "dup"), got, want, strict=True):
        assert g.dtype == torch.float32 and g.shape == shape
        assert_close(g, e, atol=5e-6, rtol=2e-6, name=f"{activation} {name}")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_activation_backward_low_precision(dtype, activation, launches, device):
    shape = (3, 7, 33)
    gate, up = _x(shape, dtype, device), torch.randn(shape, device=device).to(dtype)
    gy = torch.randn(shape, device=device).to(dtype)
    got = _fast_gated_grads(gate, up, activation, gy.float())
    want = _gated_grads(gate, up, activation, gy, torch.float64)
    base = _gated_grads(gate, up, activation, gy)  # PyTorch in the low dtype
    for name, g, e, bl in zip(("dgate", "dup"), got, want, base, strict=True):
        assert g.dtype == dtype
        assert_error_within(g, bl, e, factor=2, atol=1e-3, name=f"{activation} {name}")


# ---------------------------------------------------------------------------------------------------- torch.library

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("activation", ["quick_gelu", "relu"])
def test_opcheck_backward_ops(activation, device):
    _library.register_triton_ops()
    x, dy, bias = torch.randn(4, 3, 40, device=device), torch.randn(4, 3, 40, device=device), torch.randn(40)
    op = torch.ops.fastenc.bias_activation_backward.default
    torch.library.opcheck(op, (dy, x, bias, activation), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(op, (dy, x, None, activation), test_utils=OPCHECK_TESTS)
    gu = torch.randn(4, 3, 80, device=device)
    gated = torch.ops.fastenc.gated_activation_backward.default
    torch.library.opcheck(gated, (dy, gu[..., :40], gu[..., 40:], activation), test_utils=OPCHECK_TESTS)


def test_compile_fullgraph_training_uses_fused_backward(launches, device):
    """torch.compile(fullgraph=True) with AOT autograd: the backward graph holds the fused backward ops."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    graphs = []

    def bw_compiler(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def block(x, b, gate, up):
        h = fastenc.ops.bias_activation(x, b, "quick_gelu", backend="triton", strict=True)
        g = fastenc.ops.gated_activation(gate, up, "gelu_tanh", backend="triton", strict=True)
        return (h * h).sum() + (g * g).sum()

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=bw_compiler)
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    x, gate = _x((2, 5, 33), torch.float32, device), _x((2, 5, 33), torch.float32, device)
    leaves = [t.requires_grad_() for t in (x, torch.randn(33, device=device), gate, torch.randn_like(gate))]
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(block(*leaves), leaves)
    for g, e, name in zip(got, want, ("x", "bias", "gate", "up"), strict=True):
        assert_close(g, e, atol=1e-5, rtol=1e-5, name=f"compiled d{name}")
    assert len(graphs) == 1
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    expected = {"fastenc.bias_activation_backward.default", "fastenc.gated_activation_backward.default"}
    assert expected <= targets, targets


@pytest.mark.parametrize("kind", ["bias_activation", "gated_activation"])
def test_cuda_namespace_registration_logic(kind, launches, device):
    """register_cuda_autograd gives fastenc_cuda::<kind> FUSED_AUTOGRAD[kind]: tested on a stand-in op with the CUDA
    op's schema whose forward is the reference, so it runs without the extension."""
    ref = _library._references()[kind]

    def fwd(a: torch.Tensor, b: torch.Tensor | None, activation: str) -> torch.Tensor:
        return ref(a, b, activation).clone()

    if kind == "gated_activation":

        def fwd(a: torch.Tensor, b: torch.Tensor, activation: str) -> torch.Tensor:  # noqa: F811 - the gated schema
            return ref(a, b, activation).clone()

    if not hasattr(torch.ops.fastenc_h2test_act, kind):
        torch.library.custom_op(f"fastenc_h2test_act::{kind}", fwd, mutates_args=())
        _library.FUSED_AUTOGRAD[kind](f"fastenc_h2test_act::{kind}")
    op = getattr(torch.ops.fastenc_h2test_act, kind).default
    a = _x((3, 7, 33), torch.float32, device)
    b = torch.randn(33 if kind == "bias_activation" else (3, 7, 33), device=device)
    gy = torch.randn(3, 7, 33, device=device)
    al, bl = _leaves(a, b)
    got = torch.autograd.grad((op(al, bl, "gelu") * gy).sum(), [al, bl])
    assert launches[kind] == 1
    want = (_bias_grads if kind == "bias_activation" else _gated_grads)(a, b, "gelu", gy, torch.float64)
    for g, e in zip(got, want, strict=True):
        assert_close(g, e, atol=1e-5, rtol=2e-6)

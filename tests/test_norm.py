"""fastenc.ops.layer_norm / rms_norm on the Triton backend (kernels/norm.py) against torch and transformers.

Every kernel call goes through the op with backend="triton", strict=True and checks fastenc.trace() counted it.
On CPU the kernels run under TRITON_INTERPRET=1 (see conftest.py), so shapes stay small.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.t5.modeling_t5 import T5LayerNorm
from utils import assert_close, assert_error_within

import fastenc
from fastenc.kernels import norm as kernels
from fastenc.ops.reference import layer_norm_reference, rms_norm_reference

# Liger-style awkward shapes: odd hidden sizes, one row, a row count that is not a multiple of anything.
SHAPES = [(1, 1, 1023), (5, 123, 123), (3, 77, 768), (2, 13, 80), (4, 37), (6, 1)]
# Low-precision and layout tests: few rows, since the interpreter pays per program (about 1.5 ms a row on CPU).
LOW_SHAPES = [(1, 1, 1023), (2, 9, 768), (2, 13, 80)]
LOW = [torch.float16, torch.bfloat16]
# One unit in the last place, relative: a correctly rounded result is within 1 ulp of another correctly rounded one.
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _inputs(shape, dtype, residual, *, weight_dtype=None, device="cpu"):
    n = shape[-1]
    x = torch.randn(shape, device=device).to(dtype)
    r = torch.randn(shape, device=device).to(dtype) if residual else None
    w = (1.0 + 0.5 * torch.randn(n, device=device)).to(weight_dtype or dtype)
    b = (0.5 * torch.randn(n, device=device)).to(weight_dtype or dtype)
    return x, r, w, b


def _layer_norm(x, w, b, eps, r, count=1):
    with fastenc.trace() as t:
        out = fastenc.ops.layer_norm(x, w, b, eps, r, backend="triton", strict=True)
    assert t.counts["triton.layer_norm"] == count and not t.fallbacks, t
    return out if r is not None else (out, None)


def _rms_norm(x, w, eps, r):
    with fastenc.trace() as t:
        out = fastenc.ops.rms_norm(x, w, eps, r, backend="triton", strict=True)
    assert t.counts["triton.rms_norm"] == 1 and not t.fallbacks, t
    return out if r is not None else (out, None)


def _t5_layer_norm(weight, eps):
    m = T5LayerNorm(weight.shape[0], eps=eps)
    m.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
    return m


# ---------------------------------------------------------------------------------------------------- layer_norm


@pytest.mark.parametrize(
    "shape, residual, bias",
    [(s, r, True) for s in SHAPES for r in (False, True)] + [((2, 13, 80), False, False), ((4, 37), True, False)],
)
def test_layer_norm_fp32(shape, residual, bias, device):
    x, r, w, b = _inputs(shape, torch.float32, residual, device=device)
    b = b if bias else None
    y, s = _layer_norm(x, w, b, 1e-5, r)
    s_ref = x if r is None else x + r
    assert_close(y, F.layer_norm(s_ref, (shape[-1],), w, b, 1e-5), atol=1e-5, rtol=1e-5, name="y")
    if residual:
        assert s.dtype == x.dtype and torch.equal(s, s_ref), "residual_out must be exactly x + residual"
        assert s.data_ptr() not in (x.data_ptr(), r.data_ptr())


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("weight_dtype", ["x", torch.float32])
@pytest.mark.parametrize("shape", LOW_SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_low_precision(dtype, weight_dtype, shape, residual, device):
    """Flash-attention rule against fp32, exact residual sum, and within 1 ulp of the op's own reference."""
    wd = dtype if weight_dtype == "x" else weight_dtype
    x, r, w, b = _inputs(shape, dtype, residual, weight_dtype=wd, device=device)
    y, s = _layer_norm(x, w, b, 1e-5, r)
    assert y.dtype == dtype
    s_low = x if r is None else x + r  # eager's residual add, rounded to dtype
    if residual:
        assert s.dtype == dtype and torch.equal(s, s_low), "residual_out must equal eager x + residual bit for bit"
    n = shape[-1]
    reference = F.layer_norm(s_low.float(), (n,), w.float(), b.float(), 1e-5)
    baseline = F.layer_norm(s_low, (n,), w.to(dtype), b.to(dtype), 1e-5)
    assert_error_within(y, baseline, reference, factor=2, atol=1e-3, name="y")
    y_ref = layer_norm_reference(x, w, b, r, eps=1e-5)
    assert_close(y, y_ref if r is None else y_ref[0], atol=1e-5, rtol=ULP[dtype], name="y vs op reference")


def test_layer_norm_large_mean(device):
    """Two-pass statistics: a row mean of 1e3 with unit spread stays accurate (one-pass E[x^2] - E[x]^2 would not)."""
    x = torch.randn(4, 768, device=device) + 1e3
    w, b = torch.randn(768, device=device), torch.randn(768, device=device)
    y, _ = _layer_norm(x, w, b, 1e-6, None)
    assert_close(y, F.layer_norm(x.double(), (768,), w.double(), b.double(), 1e-6), atol=1e-3, rtol=1e-3, name="y")


def test_layer_norm_grads_with_residual(device):
    """requires_grad inputs: forward runs the kernel, backward the reference; grads match plain torch."""
    x, r, w, b = _inputs((2, 13, 80), torch.float32, True, device=device)
    leaves = [t.requires_grad_() for t in (x, r, w, b)]
    y, s = _layer_norm(x, w, b, 1e-5, r)
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    grads = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), leaves)

    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    xr, rr, wr, br = ref_leaves
    s_ref = xr + rr
    y_ref = F.layer_norm(s_ref, (80,), wr, br, 1e-5)
    assert_close(y, y_ref, atol=1e-5, rtol=1e-5, name="y")
    ref_grads = torch.autograd.grad((y_ref * gy).sum() + (s_ref * gs).sum(), ref_leaves)
    for name, g, g_ref in zip(("x", "residual", "weight", "bias"), grads, ref_grads, strict=True):
        assert_close(g, g_ref, atol=1e-5, rtol=1e-5, name=f"grad {name}")


# ------------------------------------------------------------------------------------------------------ rms_norm


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_fp32(shape, residual, device):
    x, r, w, _ = _inputs(shape, torch.float32, residual, device=device)
    y, s = _rms_norm(x, w, 1e-6, r)
    s_ref = x if r is None else x + r
    assert_close(y, _t5_layer_norm(w, 1e-6)(s_ref), atol=1e-5, rtol=1e-5, name="y")
    if residual:
        assert torch.equal(s, s_ref), "residual_out must be exactly x + residual"


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("weight_dtype", ["x", torch.float32])
@pytest.mark.parametrize("shape", LOW_SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_low_precision(dtype, weight_dtype, shape, residual, device):
    """Output dtype as the reference; flash-attention rule against fp32 T5LayerNorm; 1 ulp from the op's reference."""
    wd = dtype if weight_dtype == "x" else weight_dtype
    x, r, w, _ = _inputs(shape, dtype, residual, weight_dtype=wd, device=device)
    y, s = _rms_norm(x, w, 1e-6, r)
    y_ref = rms_norm_reference(x, w, r, eps=1e-6)
    y_ref = y_ref if r is None else y_ref[0]
    assert y.dtype == y_ref.dtype == dtype
    s_low = x if r is None else x + r
    if residual:
        assert torch.equal(s, s_low), "residual_out must equal eager x + residual bit for bit"
    reference = _t5_layer_norm(w.float(), 1e-6)(s_low.float())
    baseline = _t5_layer_norm(w.to(dtype), 1e-6)(s_low)  # T5LayerNorm in the low dtype (half weight)
    assert baseline.dtype == dtype
    assert_error_within(y, baseline, reference, factor=2, atol=1e-3, name="y")
    assert_close(y, y_ref, atol=1e-5, rtol=ULP[dtype], name="y vs op reference")


def test_rms_norm_mixed_half_dtypes(device):
    """bf16 x with an fp16 weight: the result takes the weight's dtype, as T5LayerNorm and the reference do."""
    x = torch.randn(3, 5, 64, device=device, dtype=torch.bfloat16)
    w = torch.randn(64, device=device, dtype=torch.float16)
    y, _ = _rms_norm(x, w, 1e-6, None)
    expected = _t5_layer_norm(w, 1e-6)(x)
    assert y.dtype == expected.dtype == torch.float16
    assert_close(y, expected, atol=1e-5, rtol=ULP[torch.float16], name="y")


def test_rms_norm_fp16_large_values(device):
    """T5 hidden states near fp16's max: the fp32 sum of squares must not overflow (eager's fp32 upcast does not)."""
    x = (torch.rand(2, 7, 512, device=device) * 2 - 1).mul(6e4).half()
    w = torch.rand(512, device=device).half()
    y, _ = _rms_norm(x, w, 1e-6, None)
    assert torch.isfinite(y).all()
    assert_close(y, rms_norm_reference(x, w, eps=1e-6), atol=1e-5, rtol=ULP[torch.float16], name="y")


# ----------------------------------------------------------------------------------------------- layouts, limits


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_strided_inputs(op, device):
    """x and residual as row-strided slices of wider tensors (read in place) and non-viewable layouts (copied)."""
    n = 80
    wide = torch.randn(2, 13, 3 * n, device=device)
    x, r = wide[:, :, :n], wide[:, :, 2 * n :]
    assert kernels._norm_rows(x, n).data_ptr() == x.data_ptr(), "a row-strided slice should be read without a copy"
    seq_slice = torch.randn(2, 20, n, device=device)[:, 3:16]  # rows do not flatten to one stride: copied
    transposed = torch.randn(2, n, 13, device=device).transpose(1, 2)  # last dim not unit-stride: copied
    w = 1.0 + 0.5 * torch.randn(n, device=device)
    b = torch.randn(n, device=device)
    for xx, rr in [(x, r), (seq_slice, r), (x, transposed), (transposed, None)]:
        s_ref = xx if rr is None else xx + rr
        if op == "layer_norm":
            y, s = _layer_norm(xx, w, b, 1e-5, rr)
            expected = F.layer_norm(s_ref, (n,), w, b, 1e-5)
        else:
            y, s = _rms_norm(xx, w, 1e-6, rr)
            expected = _t5_layer_norm(w, 1e-6)(s_ref)
        assert y.shape == xx.shape and y.is_contiguous()
        assert_close(y, expected, atol=1e-5, rtol=1e-5, name=f"{op} y")
        if rr is not None:
            assert torch.equal(s, s_ref)


def test_non_contiguous_weight(device):
    x = torch.randn(3, 40, device=device)
    w2 = torch.randn(80, device=device)
    y, _ = _layer_norm(x, w2[::2], w2[1::2], 1e-5, None)
    assert_close(y, F.layer_norm(x, (40,), w2[::2], w2[1::2], 1e-5), atol=1e-5, rtol=1e-5, name="y")


def test_empty_rows(device):
    x = torch.randn(0, 7, 768, device=device)
    w = torch.randn(768, device=device)
    y, s = _layer_norm(x, w, None, 1e-5, torch.randn_like(x))
    assert y.shape == s.shape == x.shape


@pytest.mark.filterwarnings("ignore::fastenc.FallbackWarning")
def test_too_wide_row_is_unsupported(device):
    n = kernels.MAX_FUSED_N + 1
    x = torch.randn(1, n, device=device)
    w = torch.ones(n, device=device)
    assert str(kernels.MAX_FUSED_N) in kernels.norm_unsupported_reason(x)
    assert kernels.norm_unsupported_reason(x[:, : n - 1]) is None
    with pytest.raises(fastenc.BackendUnavailableError, match=str(kernels.MAX_FUSED_N)):
        fastenc.ops.rms_norm(x, w, 1e-6, backend="triton", strict=True)
    with fastenc.trace() as t:
        fastenc.ops.layer_norm(x, w, None, 1e-5, backend="triton")
    assert t.counts["torch.layer_norm"] == 1 and t.fallbacks[0].ran == "torch"


def test_widest_fused_row_fits_registers():
    """The widest row a program holds is at most 32 fp32 values per thread: 65536 columns (64 per thread at 32 warps,
    64 registers each) spilled 144-264 B on sm_90a, 32768 fp32 LayerNorm 16-24 B (see the NOTE at MAX_FUSED_N)."""
    for n in (768, 4096, 5120, kernels.MAX_FUSED_N):
        block_n, num_warps = kernels._norm_config(n)
        assert block_n // (32 * num_warps) <= 32, (n, block_n, num_warps)


BAD_INPUTS = [
    ("weight", lambda x, w, r: fastenc.ops.layer_norm(x, w[:-1], None, 1e-5, backend="triton")),
    ("weight", lambda x, w, r: fastenc.ops.rms_norm(x, w[None], 1e-6, backend="triton")),
    ("bias", lambda x, w, r: fastenc.ops.layer_norm(x, w, w[:-1], 1e-5, backend="triton")),
    ("residual", lambda x, w, r: fastenc.ops.layer_norm(x, w, None, 1e-5, r[:, :-1], backend="triton")),
    ("residual", lambda x, w, r: fastenc.ops.rms_norm(x, w, 1e-6, r.half(), backend="triton")),
    ("x", lambda x, w, r: fastenc.ops.layer_norm(x.long(), w, None, 1e-5, backend="triton")),
    ("x", lambda x, w, r: fastenc.ops.rms_norm(x.int(), w, 1e-6, backend="triton")),
    ("eps", lambda x, w, r: fastenc.ops.rms_norm(x, w, -1.0, backend="triton")),
]


@pytest.mark.parametrize("arg, call", BAD_INPUTS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BAD_INPUTS)])
def test_bad_inputs_name_the_argument(arg, call, device):
    x = torch.randn(2, 5, 16, device=device)
    with pytest.raises(fastenc.InputError, match=rf"\b{arg}\b"):
        call(x, torch.ones(16, device=device), torch.randn_like(x))

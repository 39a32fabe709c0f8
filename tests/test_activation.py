"""fastenc.ops.bias_activation and kernels.activation.gated_activation_forward on the Triton backend against torch and
transformers' ACT2FN. bias_activation runs through the op (backend="triton", strict=True; fastenc.trace() must count
it); gated_activation_forward has no op yet and is called directly. CPU runs use TRITON_INTERPRET=1: small shapes.
"""

import pytest
import torch
from transformers.activations import ACT2FN
from utils import assert_close, assert_error_within

import fastenc
from fastenc.kernels import activation as kernels
from fastenc.ops.reference import HF_ACTIVATIONS, activation_reference, bias_activation_reference

# Under the interpreter numpy warns when exp(-x) or x^3 overflows to inf in the far tails; the results (0 or x) are
# still exact, as on CUDA (test_extreme_values checks them).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in:RuntimeWarning")

HF_NAMES = ["quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"]
ACTIVATIONS = ["quick_gelu", "gelu", "gelu_tanh", "relu"]
# Hidden sizes that are not powers of two (CLIP 3072, SigLIP-so400m 4304/2730-like, odd 37) and a one-row case.
SHAPES = [(1, 1, 1023), (3, 7, 3072), (2, 5, 2730), (4, 37)]
LOW = [torch.float16, torch.bfloat16]
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _bias_activation(x, bias, activation):
    with fastenc.trace() as t:
        y = fastenc.ops.bias_activation(x, bias, activation, backend="triton", strict=True)
    assert t.counts["triton.bias_activation"] == 1 and not t.fallbacks, t
    return y


def _x(shape, dtype, device):
    return (3.0 * torch.randn(shape, device=device)).to(dtype)  # spans both tails of every activation


@pytest.mark.parametrize("hf_name", HF_NAMES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_bias_activation_fp32(hf_name, shape, bias, device):
    x = _x(shape, torch.float32, device)
    b = torch.randn(shape[-1], device=device) if bias else None
    y = _bias_activation(x, b, HF_ACTIVATIONS[hf_name])
    h = x if b is None else x + b
    assert_close(y, ACT2FN[hf_name](h.double()), atol=1e-6, rtol=1e-6, name=f"{hf_name} y vs float64")
    # NOTE: torch's own fp32 erf-gelu is up to 1.2e-6 off float64 near x = -3 (1 + erf cancels), ours 4.5e-7.
    assert_close(y, ACT2FN[hf_name](h), atol=2e-6, rtol=1e-6, name=f"{hf_name} y vs fp32 ACT2FN")
    expected = bias_activation_reference(x, b, activation=HF_ACTIVATIONS[hf_name])
    assert_close(y, expected, atol=2e-6, rtol=1e-6, name=f"{hf_name} y vs op reference")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("hf_name", HF_NAMES)
@pytest.mark.parametrize("bias_dtype", ["x", torch.float32])
def test_bias_activation_low_precision(dtype, hf_name, bias_dtype, device):
    """Flash-attention rule against fp32 ACT2FN, and within 1 ulp of the op's reference (fp32 math, one rounding)."""
    x = _x((3, 7, 3072), dtype, device)
    b = torch.randn(3072, device=device).to(dtype if bias_dtype == "x" else bias_dtype)
    y = _bias_activation(x, b, HF_ACTIVATIONS[hf_name])
    assert y.dtype == dtype
    reference = ACT2FN[hf_name](x.float() + b.float())
    baseline = ACT2FN[hf_name](x + b.to(dtype))  # PyTorch in the low dtype
    assert_error_within(y, baseline, reference, factor=2, atol=1e-3, name=f"{hf_name} y")
    expected = bias_activation_reference(x, b, activation=HF_ACTIVATIONS[hf_name])
    assert_close(y, expected, atol=1e-5, rtol=ULP[dtype], name=f"{hf_name} y vs op reference")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_extreme_values(activation, device):
    """Far tails: no inf/NaN from exp overflow; every activation is x or 0 there (up to fp32 rounding)."""
    x = torch.tensor([[-1e4, -100.0, -30.0, -0.0, 0.0, 1e-30, 30.0, 100.0, 1e4, 3e38, -3e38]], device=device)
    y = _bias_activation(x, None, activation)
    assert torch.isfinite(y).all(), y
    assert_close(y, activation_reference(x, activation), atol=1e-6, rtol=1e-6, name=activation)


SPECIAL = [float("nan"), float("inf"), -float("inf"), -1.0, 0.5, 2.0, -3.0, 1.0]  # bias: NaN at column 6


def _check_special(y, ref, nan_in, name):
    """y keeps every non-finite value of the reference (NaN where the input was NaN); finite values match."""
    y, ref = y.float(), ref.float()
    assert torch.equal(torch.isfinite(y), torch.isfinite(ref)), f"{name}: finite pattern {y} vs torch {ref}"
    assert y[nan_in].isnan().all(), f"{name}: NaN input gave {y[nan_in]}"
    fin = torch.isfinite(ref)
    assert_close(y[fin], ref[fin], atol=1e-5, rtol=1e-2, name=name)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy: inf * 0
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_and_inf_are_not_hidden(activation, dtype, device):
    """NaN in x, the bias, gate or up comes out NaN, as in torch (relu through tl.maximum gave 0 for NaN: a NaN pixel
    became finite embeddings); inf comes out non-finite wherever torch's is (gelu(inf): inf here, NaN in torch)."""
    x = torch.tensor([SPECIAL, SPECIAL[::-1]], device=device).to(dtype)
    bias = torch.zeros(len(SPECIAL), device=device).to(dtype)
    bias[6] = float("nan")
    y = _bias_activation(x, bias, activation)
    nan_in = x.isnan() | bias.isnan()
    _check_special(y, activation_reference(x.float() + bias.float(), activation), nan_in, f"{activation} x + bias")
    y = _bias_activation(x, None, activation)
    _check_special(y, activation_reference(x.float(), activation), x.isnan(), f"{activation} x")
    up = torch.ones_like(x)
    up[:, 5] = float("nan")
    y = kernels.gated_activation_forward(x, up, activation)
    ref = activation_reference(x.float(), activation) * up.float()
    _check_special(y, ref, x.isnan() | up.isnan(), f"gated {activation}")


def test_strided_and_non_contiguous_x(device):
    wide = _x((2, 9, 3 * 80), torch.float32, device)
    b = torch.randn(80, device=device)
    row_strided = wide[:, :, 80:160]  # read in place through its row stride
    assert kernels._activation_rows(row_strided).data_ptr() == row_strided.data_ptr()
    transposed = _x((2, 80, 9), torch.float32, device).transpose(1, 2)  # copied to contiguous
    for x in (row_strided, transposed):
        y = _bias_activation(x, b, "gelu")
        assert y.shape == x.shape
        assert_close(y, torch.nn.functional.gelu(x + b), atol=1e-6, rtol=1e-6, name="y")


def test_empty_and_scalar(device):
    assert _bias_activation(torch.randn(0, 5, device=device), None, "relu").shape == (0, 5)
    for shape in ((4, 0), (2, 3, 0)):  # an empty last dim has no (rows, 0) view: the launcher returns first
        x = torch.randn(*shape, device=device)
        assert _bias_activation(x, None, "gelu").shape == shape
        assert fastenc.ops.gated_activation(x, x, "gelu", backend="triton", strict=True).shape == shape
    x = torch.tensor(-2.0, device=device)
    assert_close(_bias_activation(x, None, "quick_gelu"), x * torch.sigmoid(1.702 * x), atol=1e-6, rtol=1e-6)


def test_grads(device):
    """requires_grad inputs: forward runs the kernel, backward the reference; grads match plain torch."""
    x = _x((2, 13, 80), torch.float32, device).requires_grad_()
    b = torch.randn(80, device=device, requires_grad=True)
    y = _bias_activation(x, b, "gelu_tanh")
    g = torch.randn_like(y)
    gx, gb = torch.autograd.grad((y * g).sum(), (x, b))
    xr, br = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    gxr, gbr = torch.autograd.grad((ACT2FN["gelu_new"](xr + br) * g).sum(), (xr, br))
    assert_close(gx, gxr, atol=1e-5, rtol=1e-5, name="grad x")
    assert_close(gb, gbr, atol=1e-5, rtol=1e-5, name="grad bias")


BAD_INPUTS = [
    ("activation", lambda x: fastenc.ops.bias_activation(x, None, "swish", backend="triton")),
    ("x", lambda x: fastenc.ops.bias_activation(x.long(), None, "relu", backend="triton")),
    ("bias", lambda x: fastenc.ops.bias_activation(x, torch.zeros(15), "relu", backend="triton")),
    ("bias", lambda x: fastenc.ops.bias_activation(x, torch.zeros(16).long(), "relu", backend="triton")),
]


@pytest.mark.parametrize("arg, call", BAD_INPUTS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BAD_INPUTS)])
def test_bad_inputs_name_the_argument(arg, call, device):
    with pytest.raises(fastenc.InputError, match=rf"\b{arg}\b"):
        call(torch.randn(2, 5, 16, device=device))


def test_unsupported_reason():
    assert kernels.bias_activation_unsupported_reason(torch.empty(4, 5120)) is None
    too_wide = torch.empty(0, kernels.MAX_BLOCK_N * kernels.MAX_GRID_AXIS_1 + 1)
    assert "column blocks" in kernels.bias_activation_unsupported_reason(too_wide)


# ------------------------------------------------------------------------------------------------ gated activation


def _gated_reference(gate, up, activation):
    return (activation_reference(gate.float(), activation) * up.float()).to(gate.dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
# fp32 atol: the activation's own fp32 error (torch's erf-gelu: 1.2e-6 near x = -3) times |up| (up to ~10 here).
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-5, 1e-6), (torch.float16, 1e-5, ULP[torch.float16]),
                                               (torch.bfloat16, 1e-5, ULP[torch.bfloat16])])  # fmt: skip
@pytest.mark.parametrize("shape", [(2, 13, 80), (1, 1, 1023), (3, 37)])
def test_gated_activation(activation, dtype, atol, rtol, shape, device):
    gate, up = _x(shape, dtype, device), _x(shape, dtype, device)
    y = kernels.gated_activation_forward(gate, up, activation)
    assert y.dtype == dtype and y.shape == gate.shape
    assert_close(y, _gated_reference(gate, up, activation), atol=atol, rtol=rtol, name=activation)
    if dtype != torch.float32:
        reference = activation_reference(gate.float(), activation) * up.float()
        baseline = activation_reference(gate, activation) * up
        assert_error_within(y, baseline, reference, factor=2, atol=1e-3, name=activation)


def test_gated_activation_fused_projection_halves(device):
    """T5 gated-gelu with wi_0 / wi_1 fused into one matmul: gate and up are row-strided halves of one tensor."""
    h = _x((2, 9, 2 * 96), torch.bfloat16, device)
    gate, up = h.chunk(2, dim=-1)
    y = kernels.gated_activation_forward(gate, up, "gelu_tanh")
    assert_close(y, _gated_reference(gate, up, "gelu_tanh"), atol=1e-5, rtol=ULP[torch.bfloat16], name="y")


def test_gated_activation_bad_inputs(device):
    x = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match="gate and up"):
        kernels.gated_activation_forward(x, x[:, :4], "gelu")
    with pytest.raises(ValueError, match="gate and up"):
        kernels.gated_activation_forward(x, x.half(), "gelu")
    with pytest.raises(ValueError, match="activation"):
        kernels.gated_activation_forward(x, x, "silu")

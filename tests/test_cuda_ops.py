"""GPU parity of every fastenc CUDA launcher (fastenc/core/cuda.py -> csrc/) against the torch reference and the Triton
kernel, fp32/fp16/bf16 and awkward shapes, plus torch.library.opcheck of each torch.ops.fastenc_cuda op.

Low-precision rule (flash-attention's): error vs an fp32 reference <= 2x PyTorch's own error in the same dtype.
Everything here needs a GPU and the built (or JIT-buildable) extension; it skips with the reason otherwise.
"""

from __future__ import annotations

import pytest
import torch
from utils import assert_close, assert_error_within

from fastenc.core import cuda as _cuda
from fastenc.ops.reference import (
    attention_reference,
    bias_activation_reference,
    gated_activation_reference,
    layer_norm_reference,
    rms_norm_reference,
)


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA and the fastenc CUDA extension (no CUDA device here)"
    why = _cuda.unavailable_reason()
    return None if why is None else f"needs CUDA and the fastenc CUDA extension: {why}"


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]
ROWS = [1, 3, 1023]
NS = [768, 1280, 4096, 5120, 100, 1]
FP32_ATOL = 2e-5


def _triton(name):
    import fastenc.kernels.activation
    import fastenc.kernels.attention
    import fastenc.kernels.norm

    mod, fn = name.split(".")
    return getattr(getattr(fastenc.kernels, mod), fn)


def _check(actual, baseline, reference, dtype, name, atol_low=1e-3):
    """fp32: close to the fp32 reference; fp16/bf16: within 2x torch's own error in the dtype."""
    assert actual.dtype == baseline.dtype, f"{name}: dtype {actual.dtype}, expected {baseline.dtype}"
    if dtype == torch.float32:
        assert_close(actual, reference, atol=FP32_ATOL, rtol=1e-5, name=name)
    else:
        assert_error_within(actual, baseline, reference, factor=2.0, atol=atol_low, name=name)


# ---------------------------------------------------------------------------------------------------- norms


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_layer_norm(dtype, rows, n, residual):
    x = torch.randn(rows, n, device="cuda").to(dtype)
    r = torch.randn(rows, n, device="cuda").to(dtype) if residual else None
    w = (1 + 0.5 * torch.randn(n, device="cuda")).to(dtype)
    b = (0.5 * torch.randn(n, device="cuda")).to(dtype)
    y, s = _cuda.cuda_layer_norm_forward(x, w, b, 1e-5, r)
    ref = layer_norm_reference(x.float(), w.float(), b.float(), None if r is None else r.float(), eps=1e-5)
    base = layer_norm_reference(x, w, b, r, eps=1e-5)
    ref_y, base_y = (ref[0], base[0]) if residual else (ref, base)
    if residual:
        torch.testing.assert_close(s, x + r, atol=0, rtol=0)  # the rounded sum is exact, as eager
        # statistics of the rounded sum: compare against the reference on the same s
        ref_y = layer_norm_reference(s.float(), w.float(), b.float(), eps=1e-5)
    _check(y, base_y, ref_y, dtype, "layer_norm y")
    ty, ts = _triton("norm.layer_norm_forward")(x, w, b, 1e-5, r)
    assert_close(y, ty, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-2, name="layer_norm vs triton")
    assert (s is None) == (ts is None)


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_layer_norm_mixed_weight_dtypes(x_dtype, w_dtype):
    x = torch.randn(5, 123, device="cuda").to(x_dtype)
    w = (1 + 0.5 * torch.randn(123, device="cuda")).to(w_dtype)
    b = (0.5 * torch.randn(123, device="cuda")).to(torch.bfloat16)  # a third dtype: upcast in the launcher
    y, _ = _cuda.cuda_layer_norm_forward(x, w, b, 1e-6, None)
    assert y.dtype == x_dtype
    assert_close(y, layer_norm_reference(x, w, b, eps=1e-6), atol=1e-5, rtol=1e-2, name="y")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("w_dtype", [None, torch.float32], ids=["w=x", "w32"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_rms_norm(dtype, w_dtype, rows, n, residual):
    x = torch.randn(rows, n, device="cuda").to(dtype)
    r = torch.randn(rows, n, device="cuda").to(dtype) if residual else None
    w = (1 + 0.5 * torch.randn(n, device="cuda")).to(w_dtype or dtype)
    y, s = _cuda.cuda_rms_norm_forward(x, w, 1e-6, r)
    xs = x if r is None else x + r
    if residual:
        torch.testing.assert_close(s, xs, atol=0, rtol=0)
    base = rms_norm_reference(xs, w, eps=1e-6)  # T5 semantics in the low dtype (half weight: half output)
    ref = rms_norm_reference(xs.float(), w.float(), eps=1e-6)
    _check(y, base, ref, base.dtype, "rms_norm y")
    ty, _ = _triton("norm.rms_norm_forward")(x, w, 1e-6, r)
    assert_close(y, ty, atol=1e-5 if y.dtype == torch.float32 else 1e-2, rtol=1e-2, name="rms_norm vs triton")


def test_norm_strided_rows_and_3d():
    """A slice x[..., :N] of a wider tensor is read in place through its row stride; (B, S, N) inputs keep shape."""
    wide = torch.randn(2, 9, 800, device="cuda", dtype=torch.float16)
    x = wide[..., :768]
    w = torch.randn(768, device="cuda", dtype=torch.float16)
    b = torch.randn(768, device="cuda", dtype=torch.float16)
    y, _ = _cuda.cuda_layer_norm_forward(x, w, b, 1e-5, None)
    assert y.shape == x.shape
    assert_close(y, layer_norm_reference(x, w, b, eps=1e-5), atol=1e-2, rtol=1e-2, name="strided")


# ---------------------------------------------------------------------------------------------------- activations


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("activation", _cuda.ACTIVATIONS)
@pytest.mark.parametrize("shape", [(1, 768), (3, 3072), (1023, 100), (2, 7, 5120), (5, 37)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_bias_activation(dtype, activation, shape, bias):
    x = (2 * torch.randn(shape, device="cuda")).to(dtype)
    b = torch.randn(shape[-1], device="cuda").to(dtype) if bias else None
    y = _cuda.cuda_bias_activation_forward(x, b, activation)
    ref = bias_activation_reference(x.float(), None if b is None else b.float(), activation=activation)
    base_h = x if b is None else x + b
    base = bias_activation_reference(base_h, None, activation=activation)  # torch in the low dtype, as eager
    _check(y, base, ref, dtype, f"{activation} y")
    ty = _triton("activation.bias_activation_forward")(x, b, activation)
    assert_close(y, ty, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-2, name="vs triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "quick_gelu"])
@pytest.mark.parametrize("rows, n", [(1, 1024), (3, 2816), (1023, 100), (2, 10240), (4, 37)])
def test_gated_activation_on_halves_of_one_tensor(dtype, activation, rows, n):
    h = torch.randn(rows, 2 * n, device="cuda").to(dtype)
    gate, up = h[:, :n], h[:, n:]  # strided views, as a fused (..., 2N) projection gives
    y = _cuda.cuda_gated_activation_forward(gate, up, activation)
    ref = gated_activation_reference(gate.float(), up.float(), activation=activation)
    base = (bias_activation_reference(gate, None, activation=activation) * up).to(dtype)
    _check(y, base, ref, dtype, f"gated {activation}")
    ty = _triton("activation.gated_activation_forward")(gate, up, activation)
    assert_close(y, ty, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-2, name="vs triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("activation", _cuda.ACTIVATIONS)
def test_activation_nan_is_not_hidden(dtype, activation):
    """NaN in x, bias or up comes out NaN as in torch (fmaxf-based relu gave 0); inf non-finite where torch's is."""
    special = [float("nan"), float("inf"), -float("inf"), -1.0, 0.5, 2.0, -3.0, 1.0] * 2
    x = torch.tensor([special, special[::-1]], device="cuda").to(dtype)
    b = torch.zeros(x.shape[1], device="cuda").to(dtype)
    b[6] = float("nan")
    y = _cuda.cuda_bias_activation_forward(x, b, activation).float()
    ref = bias_activation_reference(x.float(), b.float(), activation=activation)
    assert torch.equal(torch.isfinite(y), torch.isfinite(ref)), (y, ref)
    assert y[x.isnan() | b.isnan()].isnan().all()
    up = torch.ones_like(x)
    up[:, 5] = float("nan")
    y = _cuda.cuda_gated_activation_forward(x, up, activation).float()
    ref = gated_activation_reference(x.float(), up.float(), activation=activation)
    assert torch.equal(torch.isfinite(y), torch.isfinite(ref)), (y, ref)
    assert y[x.isnan() | up.isnan()].isnan().all()


# ---------------------------------------------------------------------------------------------------- attention

ATTN_CASES = [
    # (B, H, Sq, Sk, D, causal, padding)
    (2, 12, 77, 77, 64, True, True),  # CLIP text
    (3, 12, 64, 64, 64, False, True),  # SigLIP text
    (2, 20, 77, 77, 80, True, False),  # 1280-wide text tower
    (1, 16, 77, 77, 128, False, True),
    (2, 3, 1, 1, 64, False, False),
    (2, 3, 7, 7, 72, True, True),
    (1, 2, 200, 64, 64, False, True),  # Sq beyond one CTA, cross-attention shapes
    (2, 4, 128, 128, 128, True, True),
    (1, 2, 5, 9, 40, False, False),
]


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 1e-4), (torch.bfloat16, 1e-3)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("b, h, sq, sk, d, causal, padding", ATTN_CASES)
def test_attention(dtype, atol, b, h, sq, sk, d, causal, padding):
    q = torch.randn(b, sq, h, d, device="cuda").to(dtype).transpose(1, 2)  # (B, H, Sq, D) from a (B, S, H, D) layout
    k = torch.randn(b, sk, h, d, device="cuda").to(dtype).transpose(1, 2)
    v = torch.randn(b, sk, h, d, device="cuda").to(dtype).transpose(1, 2)
    kpm = None
    if padding:
        lengths = torch.randint(1, sk + 1, (b,), device="cuda")
        kpm = torch.arange(sk, device="cuda")[None, :] < lengths[:, None]
    scale = d**-0.5
    assert _cuda.cuda_attention_unsupported_reason(q, k, v, None) is None
    out = _cuda.cuda_attention_forward(q, k, v, causal=causal, key_padding_mask=kpm, bias=None, scale=scale)
    assert out.shape == (b, h, sq, d) and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous()  # (B, Sq, H, D) buffer, as Triton returns
    ref = attention_reference(q.float(), k.float(), v.float(), kpm, causal=causal, scale=scale)
    base = attention_reference(q, k, v, kpm, causal=causal, scale=scale)
    assert_error_within(out, base, ref, factor=2.0, atol=atol, name=f"attention {dtype}")
    tri = _triton("attention.attention_forward")(q, k, v, causal=causal, key_padding_mask=kpm, bias=None, scale=scale)
    assert_close(out, tri, atol=2e-2, rtol=2e-2, name="vs triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_attention_fully_masked_rows_are_zero(dtype):
    b, h, s, d = 3, 4, 77, 64
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype) for _ in range(3))
    kpm = torch.ones(b, s, dtype=torch.bool, device="cuda")
    kpm[1] = False  # batch 1: every key masked
    kpm[2, 0] = False  # batch 2, causal: query 0 sees only key 0, which is masked
    out = _cuda.cuda_attention_forward(q, k, v, causal=True, key_padding_mask=kpm, bias=None, scale=d**-0.5)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()
    assert (out[2, :, 0] == 0).all()
    ref = attention_reference(q.float(), k.float(), v.float(), kpm, causal=True, scale=d**-0.5)
    assert_close(out, ref, atol=2e-2, rtol=2e-2, name="masked")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("where, value", [("q", "nan"), ("q", "inf"), ("k", "nan"), ("k", "inf"), ("v", "nan")])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_attention_nan_and_inf_are_not_hidden(dtype, where, value, backend):
    """NaN / inf in q, k, v reach the rows that attend them (an fp16 overflow upstream must not become finite
    embeddings); a NaN score at a masked key does not leak; fully masked rows stay exactly 0. Same non-finite pattern
    as the torch reference. Batch 1 masks key 0 (causal row 0 sees nothing) and keys >= 40."""
    b, h, s, d = 2, 4, 77, 64
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype) for _ in range(3))
    kpm = torch.ones(b, s, dtype=torch.bool, device="cuda")
    kpm[1, 0] = False
    kpm[1, 40:] = False
    val = float(value)
    if where == "q":
        q[:, 1, 5, 3] = val
    elif where == "k":
        k[:, 1, 3, 2] = val
        k[1, 2, 60, 2] = val  # a masked key: must not leak
    else:
        v[:, 1, 3, 2] = val
    fwd = _cuda.cuda_attention_forward if backend == "cuda" else _triton("attention.attention_forward")
    out = fwd(q, k, v, causal=True, key_padding_mask=kpm, bias=None, scale=d**-0.5).float()
    ref = attention_reference(q.float(), k.float(), v.float(), kpm, causal=True, scale=d**-0.5)
    assert not torch.isfinite(ref).all()
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    if value == "nan":
        assert torch.equal(out.isnan(), ref.isnan())
    assert (out[1, :, 0] == 0).all()  # every key masked
    fin = torch.isfinite(ref)
    assert_close(out[fin], ref[fin], atol=2e-2, rtol=2e-2, name="finite outputs")


def test_attention_refusals_reach_the_caller():
    q = torch.randn(1, 2, 9, 64, device="cuda", dtype=torch.float16)
    assert "fp16/bf16 only" in _cuda.cuda_attention_unsupported_reason(q.float(), q.float(), q.float(), None)
    with pytest.raises(Exception, match="bias"):
        _cuda.cuda_attention_forward(
            q, q, q, causal=False, key_padding_mask=None, bias=torch.zeros(1, 1, 9, 9, device="cuda"), scale=0.1
        )


# ---------------------------------------------------------------------------------------------------- opcheck


def _opcheck_cases():
    f16 = dict(device="cuda", dtype=torch.float16)
    x = torch.randn(5, 96, **f16)
    w, b = torch.randn(96, **f16), torch.randn(96, **f16)
    q = torch.randn(2, 3, 77, 64, **f16)
    kpm = torch.ones(2, 77, dtype=torch.bool, device="cuda")
    kpm[0, 50:] = False
    return [
        ("layer_norm", (x, w, b, 1e-5, x.clone())),
        ("layer_norm", (x, w, None, 1e-5, None)),
        ("rms_norm", (x, w, 1e-6, None)),
        ("rms_norm", (x, w.float(), 1e-6, x.clone())),
        ("bias_activation", (x, b, "quick_gelu")),
        ("bias_activation", (x, None, "gelu")),
        ("gated_activation", (x, x.clone(), "gelu_tanh")),
        ("attention", (q, q.clone(), q.clone(), kpm, True, 0.125)),
        ("attention", (q, q.clone(), q.clone(), None, False, 0.125)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_opcheck(case):
    cases = _opcheck_cases()
    assert len(cases) == 9
    name, args = cases[case]
    from fastenc.ops._library import load_cuda_ops

    load_cuda_ops()  # the backward formulas, as the ops' first CUDA call registers them
    op = getattr(torch.ops.fastenc_cuda, name).default
    # schema, fake-tensor (shapes, dtypes, strides of the fakes), autograd registration, AOT dispatch
    torch.library.opcheck(op, args)

"""The fused Triton attention backward (kernels/attention.py "Backward") against autograd through the torch reference.

Every call goes through `fastenc.ops.attention(..., backend="triton", strict=True)` (the interpreter on CPU) and
`fastenc.trace()` must show both the forward and the fused backward ran. fp32 gradients are held tight; fp16 / bf16
follow flash-attention's rule against a float64 reference (error <= 2x PyTorch's own error in the dtype, + atol).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from utils import assert_close, assert_error_within

import fastenc
from fastenc.kernels import attention as K
from fastenc.ops import _library
from fastenc.ops.attention import register_recompute_autograd
from fastenc.ops.reference import attention_reference, relative_bias_reference, relative_position_buckets

FP32_TOL = {"atol": 2e-5, "rtol": 1e-4}
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
NAMES = ("q", "k", "v", "bias", "rel_bias_table")


def _inputs(b, h, sq, sk, d, *, kpm=None, bias=None, rel=None, dtype=torch.float32, device="cpu"):
    """Leaves (q, k, v, bias or None, table or None) and the non-differentiable masks (key_padding_mask, lut).

    kpm: None, "random" (~70% kept, key 0 always), "empty" (batch 0 keeps no key). bias: a shape tuple or None.
    rel: None or (num_buckets, max_distance) for a T5 table + lut."""
    q = torch.randn(b, h, sq, d, device=device).to(dtype)
    k = torch.randn(b, h, sk, d, device=device).to(dtype)
    v = torch.randn(b, h, sk, d, device=device).to(dtype)
    mask = None
    if kpm is not None:
        mask = torch.rand(b, sk, device=device) > 0.3
        mask[:, 0] = True
        if kpm == "empty":
            mask[0] = False
    bias_t = None if bias is None else torch.randn(bias, device=device).to(dtype)
    table = lut = None
    if rel is not None:
        table = torch.randn(rel[0], h, device=device).to(dtype)
        lut = relative_position_buckets(sq, sk, num_buckets=rel[0], max_distance=rel[1], device=device)
    return [q, k, v, bias_t, table], mask, lut


def _leaves(tensors, grad_bias=True):
    out = []
    for i, t in enumerate(tensors):
        if t is None:
            out.append(None)
        else:
            out.append(t.detach().clone().requires_grad_(i != 3 or grad_bias))
    return out


def _grads(leaves):
    return [None if t is None or not t.requires_grad else t.grad for t in leaves]


def _fast(leaves, mask, lut, causal, grad_out, scale=None):
    """Forward + backward through the Triton op; asserts the kernels (not a fall-back) ran."""
    q, k, v, bias, table = leaves
    with fastenc.trace() as t:
        out = fastenc.ops.attention(
            q, k, v, causal=causal, key_padding_mask=mask, bias=bias, rel_bias_table=table, rel_bias_lut=lut,
            scale=scale, backend="triton", strict=True,
        )  # fmt: skip
        out.backward(grad_out)
    assert t.counts["triton.attention"] == 1 and t.counts["triton.attention_backward"] == 1, dict(t.counts)
    assert not t.fallbacks
    return out


def _reference(leaves, mask, lut, causal, grad_out, scale=None):
    q, k, v, bias, table = leaves
    out = attention_reference(q, k, v, mask, bias, table, lut, causal=causal, scale=scale)
    out.backward(grad_out)
    return out


# (B, H, Sq, Sk, D, causal, key padding, bias shape, T5 (num_buckets, max_distance)); lengths 1, 7, 33, head dims
# 16 .. 128 incl. 40 / 72 / 80 / 104; every bias broadcast pattern; not a full product (the interpreter is slow)
FP32_CASES = [
    (1, 1, 1, 1, 16, False, None, None, None),
    (1, 1, 1, 1, 64, True, "random", None, None),
    (2, 2, 7, 7, 40, True, "random", None, None),
    (2, 2, 33, 33, 72, True, None, None, None),
    (2, 1, 7, 33, 80, False, "random", (1, 1, 7, 33), None),
    (2, 2, 33, 7, 104, False, None, (2, 1, 33, 7), None),
    (2, 2, 20, 20, 64, False, "empty", (1, 2, 20, 20), None),
    (1, 2, 17, 17, 32, True, None, (1, 2, 17, 17), None),
    (2, 2, 19, 19, 48, False, "random", (1, 1, 1, 19), None),
    (2, 2, 12, 12, 128, False, None, (2, 2, 12, 12), None),
    (2, 2, 21, 21, 64, False, "random", None, (32, 128)),
    (1, 2, 9, 26, 80, False, None, None, (8, 20)),
    (2, 2, 33, 33, 104, True, "random", (2, 1, 33, 33), (16, 40)),
    (2, 2, 1, 7, 64, False, "random", (2, 2, 1, 7), (8, 20)),
    (1, 2, 7, 1, 16, False, None, None, (8, 20)),
]


@pytest.mark.parametrize("b, h, sq, sk, d, causal, kpm, bias, rel", FP32_CASES, ids=lambda x: str(x))
def test_fp32_gradients_match_reference(b, h, sq, sk, d, causal, kpm, bias, rel, device):
    tensors, mask, lut = _inputs(b, h, sq, sk, d, kpm=kpm, bias=bias, rel=rel, device=device)
    fast, ref = _leaves(tensors), _leaves(tensors)
    grad_out = torch.randn(b, h, sq, d, device=device)
    out = _fast(fast, mask, lut, causal, grad_out)
    want = _reference(ref, mask, lut, causal, grad_out)
    assert_close(out, want, name="out", **FP32_TOL)
    for name, got, exp in zip(NAMES, _grads(fast), _grads(ref), strict=True):
        assert (got is None) == (exp is None), name
        if got is not None:
            assert got.dtype == exp.dtype and got.shape == exp.shape, name
            assert_close(got, exp, name=f"d{name}", **FP32_TOL)


def test_bias_without_grad_and_partial_needs(device):
    """Only the inputs that require grad get one; a bias that does not require grad gets no dbias buffer."""
    tensors, mask, lut = _inputs(2, 2, 13, 13, 32, kpm="random", bias=(1, 2, 13, 13), rel=(8, 20), device=device)
    fast, ref = _leaves(tensors, grad_bias=False), _leaves(tensors, grad_bias=False)
    for leaves in (fast, ref):
        leaves[1].requires_grad_(False)  # k
        leaves[4].requires_grad_(False)  # table
    grad_out = torch.randn(2, 2, 13, 32, device=device)
    _fast(fast, mask, lut, False, grad_out)
    _reference(ref, mask, lut, False, grad_out)
    assert fast[1].grad is None and fast[3].grad is None and fast[4].grad is None
    for name, got, exp in zip(NAMES, _grads(fast), _grads(ref), strict=True):
        if exp is not None:
            assert_close(got, exp, name=f"d{name}", **FP32_TOL)


def test_strided_inputs_and_custom_scale(device):
    """Packed-qkv views (row stride 3 * H * D), a non-contiguous grad_out and an explicit scale."""
    b, s, h, d = 2, 19, 2, 24
    qkv = torch.randn(b, s, 3, h, d, device=device)
    grad_out = torch.randn(b, s, h, d, device=device).transpose(1, 2)  # (B, H, S, D) view
    views = []
    for _ in range(2):
        leaf = qkv.clone().requires_grad_()
        views.append((leaf, list(leaf.permute(2, 0, 3, 1, 4).unbind(0)) + [None, None]))
    _fast(views[0][1], None, None, True, grad_out, scale=0.3)
    _reference(views[1][1], None, None, True, grad_out, scale=0.3)
    assert_close(views[0][0].grad, views[1][0].grad, name="dqkv", **FP32_TOL)


# ------------------------------------------------------------------------------------ fully masked rows, big masks


@pytest.mark.parametrize("causal", [False, True])
def test_dead_rows_give_zero_gradients(causal, device):
    """Rows with every key masked (key padding, causal + padding, a -inf bias row) output the constant 0: their q rows
    get exactly 0, and they add nothing to dk / dv / dbias (the reference's gradient of the same definition)."""
    b, h, s, d = 3, 2, 21, 32
    tensors, _, _ = _inputs(b, h, s, s, d, bias=(1, h, s, s), device=device)
    tensors[3][:, :, 4] = float("-inf")  # query row 4: -inf bias at every key
    mask = torch.ones(b, s, dtype=torch.bool, device=device)
    mask[1] = False  # batch 1: no key at all
    mask[2, :7] = False  # batch 2: with causal, query rows 0..6 see nothing
    fast, ref = _leaves(tensors), _leaves(tensors)
    grad_out = torch.randn(b, h, s, d, device=device)
    _fast(fast, mask, None, causal, grad_out)
    _reference(ref, mask, None, causal, grad_out)
    for name, got, exp in zip(NAMES, _grads(fast), _grads(ref), strict=True):
        if exp is not None:
            assert_close(got, exp, name=f"d{name}", **FP32_TOL)
    dq, dk, dv = (t.grad for t in fast[:3])
    assert torch.equal(dq[1], torch.zeros_like(dq[1])) and torch.equal(dk[1], torch.zeros_like(dk[1]))
    assert torch.equal(dv[1], torch.zeros_like(dv[1]))
    assert torch.equal(dq[:, :, 4], torch.zeros_like(dq[:, :, 4]))
    if causal:
        assert torch.equal(dq[2, :, :7], torch.zeros_like(dq[2, :, :7]))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, finfo.min * log2(e)
def test_finfo_min_masked_rows_match_reference(device):
    """An HF-style finfo.min additive mask over a whole query row gives uniform attention in the forward; the backward
    must recompute that same p = 1 / Sk (a single saved log-sum-exp would round m + log2(l) to m and give p = 1)."""
    b, h, s, d = 2, 2, 18, 16
    tensors, _, _ = _inputs(b, h, s, s, d, bias=(b, 1, s, s), device=device)
    fmin = torch.finfo(torch.float32).min
    tensors[3].zero_()
    tensors[3][:, :, :, ::3] = fmin  # every third key masked
    tensors[3][0, :, 5] = fmin  # batch 0, query row 5: every key
    tensors[3][1, :, :4, 2:] = -1e9  # -1e9 style masks leave one or two keys
    fast, ref = _leaves(tensors), _leaves(tensors)
    grad_out = torch.randn(b, h, s, d, device=device)
    _fast(fast, None, None, False, grad_out)
    _reference(ref, None, None, False, grad_out)
    for name, got, exp in zip(NAMES, _grads(fast), _grads(ref), strict=True):
        if exp is not None:
            assert_close(got, exp, name=f"d{name}", **FP32_TOL)


def test_empty_keys_give_zero_gradients(device):
    """Sk = 0: the output is 0 (no key), so every gradient is 0."""
    q = torch.randn(2, 2, 5, 16, device=device, requires_grad=True)
    k = torch.randn(2, 2, 0, 16, device=device, requires_grad=True)
    v = torch.randn(2, 2, 0, 16, device=device, requires_grad=True)
    out = fastenc.ops.attention(q, k, v, backend="triton", strict=True)
    out.backward(torch.randn_like(out))
    assert torch.equal(q.grad, torch.zeros_like(q)) and k.grad.shape == k.shape and v.grad.shape == v.shape


# ------------------------------------------------------------------------------------ fp16 / bf16 error rule


def _naive(q, k, v, mask, bias, table, lut, causal, scale, dtype):
    """Attention computed entirely in `dtype` (PyTorch's own low-precision error when dtype is fp16 / bf16; the
    float64 reference otherwise); dead rows give 0 with a zero gradient, as the fused kernels' definition."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(dtype)
    if table is not None:
        s = s + relative_bias_reference(table.to(dtype), lut, s.shape[-2], s.shape[-1])
    keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device)
    if causal:
        keep = keep.tril()
    if mask is not None:
        keep = keep & mask[:, None, None, :]
    s = s.masked_fill(~keep, float("-inf"))
    dead = (s == float("-inf")).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return p @ v


LOW_CASES = [
    (2, 2, 33, 33, 64, True, "random", None, None),
    (2, 2, 7, 19, 80, False, None, (1, 2, 7, 19), None),
    (2, 2, 24, 24, 72, False, "random", None, (32, 128)),
]


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("b, h, sq, sk, d, causal, kpm, bias, rel", LOW_CASES, ids=lambda x: str(x))
def test_low_precision_gradients_error_rule(dtype, atol, b, h, sq, sk, d, causal, kpm, bias, rel, device):
    """|fast - ref_fp64| <= 2 |torch in dtype - ref_fp64| + atol for every gradient (max-abs errors)."""
    tensors, mask, lut = _inputs(b, h, sq, sk, d, kpm=kpm, bias=bias, rel=rel, dtype=dtype, device=device)
    grad_out = torch.randn(b, h, sq, d, device=device).to(dtype)
    scale = d**-0.5
    fast = _leaves(tensors)
    out = _fast(fast, mask, lut, causal, grad_out)
    assert out.dtype == dtype
    per_dtype = {}
    for ref_dtype in (torch.float64, dtype):
        leaves = _leaves(tensors)
        _naive(*leaves[:3], mask, leaves[3], leaves[4], lut, causal, scale, ref_dtype).backward(grad_out.to(ref_dtype))
        per_dtype[ref_dtype] = _grads(leaves)
    for name, got, base, ref in zip(NAMES, _grads(fast), per_dtype[dtype], per_dtype[torch.float64], strict=True):
        if ref is None:
            continue
        assert got.dtype == dtype and torch.isfinite(got.float()).all(), name
        assert_error_within(got.double(), base.double(), ref, factor=2.0, atol=atol, name=f"d{name} {dtype}")


# ------------------------------------------------------------------------------------ memory: no (Sq, Sk) tensor


class _Allocations(TorchDispatchMode):
    """Records (op, bytes) of every new storage an aten op returns (views and in-place results of known storages are
    not allocations), also inside fastenc's custom ops: their Python bodies run with this mode active, so the
    launchers' allocations and the interpreter's copies are seen. `known`: tensors that exist before the block."""

    def __init__(self, *known):
        super().__init__()
        self.sizes: list[tuple[str, int]] = []
        self.ops: list[str] = []
        self.seen = {t.untyped_storage().data_ptr() for t in known if t is not None}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastenc":
            from torch._library.custom_ops import OPDEFS

            self.ops.append(func._schema.name)
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                self.seen.add(t.untyped_storage().data_ptr())
        out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.seen:
                self.seen.add(t.untyped_storage().data_ptr())
                self.sizes.append((str(func), t.untyped_storage().nbytes()))
        return out


class _LaunchSpy:
    """Stands in for a jit kernel in fastenc.kernels.attention: records each launch, then launches."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.kernel.__name__, kwargs.get("STORE_STATS")))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("variant", ["causal+kpm", "t5", "bias"])
def test_backward_launches_triton_and_allocates_no_sq_sk_tensor(variant, device, monkeypatch):
    """At S = 256, D = 16 (fp32): no storage allocated during backward reaches Sq * Sk bytes (a quarter of one fp32
    (Sq, Sk) tensor; q, k, v are S * D * 4 = Sq * Sk / 4 bytes each); the reference vjp on the same inputs trips it."""
    b, h, s, d = 1, 1, 256, 16
    kpm = "random" if variant == "causal+kpm" else None
    bias = (1, 1, s, s) if variant == "bias" else None  # a dense bias that does not require grad
    rel = (32, 128) if variant == "t5" else None
    tensors, mask, lut = _inputs(b, h, s, s, d, kpm=kpm, bias=bias, rel=rel, device=device)
    leaves = _leaves(tensors, grad_bias=False)
    q, k, v, bias_t, table = leaves
    log: list = []
    for name in ("_attention_fwd_kernel", "_attention_bwd_delta_kernel", "_attention_bwd_dkdv_kernel",
                 "_attention_bwd_dq_kernel"):  # fmt: skip
        monkeypatch.setattr(K, name, _LaunchSpy(getattr(K, name), log))
    out = fastenc.ops.attention(
        q, k, v, causal=variant == "causal+kpm", key_padding_mask=mask, bias=bias_t, rel_bias_table=table,
        rel_bias_lut=lut, backend="triton", strict=True,
    )  # fmt: skip
    grad_out = torch.randn_like(out)
    assert log == [("_attention_fwd_kernel", True)]  # the forward wrote the row statistics
    with _Allocations(*leaves, out, grad_out, mask, lut) as rec:
        out.backward(grad_out)
    assert rec.ops == ["fastenc::attention_backward"]  # nothing recomputed: the statistics were saved
    assert [name for name, _ in log[1:]] == [
        "_attention_bwd_delta_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"
    ]  # fmt: skip
    big = [x for x in rec.sizes if x[1] >= s * s]
    assert not big, (big, sorted(rec.sizes, key=lambda x: -x[1])[:5])
    assert max(n for _, n in rec.sizes) == s * d * 4  # the largest are dq / dk / dv themselves
    if table is not None:
        assert table.grad is not None and table.grad.shape == table.shape

    # the check can fail: the reference backward of the same call builds (Sq, Sk) tensors
    ref_leaves = _leaves(tensors, grad_bias=False)
    ref_out = attention_reference(*ref_leaves[:3], mask, ref_leaves[3], ref_leaves[4], lut, causal=variant != "t5")
    with _Allocations(*ref_leaves, ref_out, grad_out, mask, lut) as rec_ref:
        ref_out.backward(grad_out)
    assert max(n for _, n in rec_ref.sizes) >= 4 * s * s


def test_op_paths_save_or_recompute(device):
    """fastenc.ops.attention under autograd saves the statistics (backward = one attention_backward); the
    inference op fastenc::attention called directly recomputes them in its backward; under no_grad the plain forward
    runs (no statistics)."""
    q, k, v = (torch.randn(1, 2, 9, 16, device=device, requires_grad=True) for _ in range(3))
    with _Allocations() as rec:
        fastenc.ops.attention(q, k, v, backend="triton").sum().backward()
    assert rec.ops == ["fastenc::attention_fwd_stats", "fastenc::attention_backward"]
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    with _Allocations() as rec:
        _library.fastenc_op("attention")(q, k, v, None, None, None, None, False, 0.25).sum().backward()
    assert rec.ops == ["fastenc::attention", "fastenc::attention_fwd_stats", "fastenc::attention_backward"]
    for got, want in zip((q.grad, k.grad, v.grad), grads, strict=True):
        assert torch.equal(got, want)
    with torch.no_grad(), _Allocations() as rec:
        fastenc.ops.attention(q, k, v, backend="triton")
    assert rec.ops == ["fastenc::attention"]


# ------------------------------------------------------------------------------------ torch.library, torch.compile


@pytest.mark.parametrize("case", ["plain", "causal_kpm", "bias", "rel_bias"])
def test_opcheck_backward_ops(case, device):
    b, h, s, d = 2, 2, 5, 8
    tensors, mask, lut = _inputs(
        b, h, s, s, d, kpm="random" if case == "causal_kpm" else None, bias=(1, h, s, s) if case == "bias" else None,
        rel=(8, 20) if case == "rel_bias" else None, device=device,
    )  # fmt: skip
    q, k, v, bias, table = _leaves(tensors)
    causal = case == "causal_kpm"
    args = (q, k, v, mask, bias, table, lut, causal, d**-0.5)
    torch.library.opcheck(_library.fastenc_op("attention_fwd_stats"), args, test_utils=OPCHECK_TESTS)
    torch.library.opcheck(_library.fastenc_op("attention"), args, test_utils=OPCHECK_TESTS)
    with torch.no_grad():
        out, stats = _library.fastenc_op("attention_fwd_stats")(*args)
    dout = torch.randn_like(out)
    bwd_args = (dout, q.detach(), k.detach(), v.detach(), out, stats, mask,
                None if bias is None else bias.detach(), None if table is None else table.detach(), lut, causal,
                d**-0.5, bias is not None, table is not None)  # fmt: skip
    torch.library.opcheck(_library.fastenc_op("attention_backward"), bwd_args, test_utils=OPCHECK_TESTS)


def test_double_backward_raises(device):
    """create_graph=True gives the right gradients; differentiating them raises DoubleBackwardError."""
    tensors, _, _ = _inputs(1, 2, 9, 9, 16, device=device)
    fast, ref = _leaves(tensors), _leaves(tensors)
    out = fastenc.ops.attention(*fast[:3], backend="triton", strict=True)
    (dq,) = torch.autograd.grad(out.square().sum(), fast[0], create_graph=True)
    (want,) = torch.autograd.grad(attention_reference(*ref[:3]).square().sum(), ref[0])
    assert_close(dq, want, name="dq", **FP32_TOL)
    with pytest.raises(fastenc.DoubleBackwardError, match="not differentiable"):
        dq.sum().backward()


def test_compile_fullgraph_backward_matches_eager(device):
    """torch.compile(fullgraph=True) through ops.attention (aot_eager traces the registered backward): T5 table and a
    broadcast bias included, gradients equal eager's."""
    b, h, s, d = 2, 2, 11, 16
    tensors, mask, lut = _inputs(b, h, s, s, d, kpm="random", bias=(1, h, 1, s), rel=(8, 20), device=device)

    def f(q, k, v, bias, table):
        o = fastenc.ops.attention(q, k, v, key_padding_mask=mask, bias=bias, rel_bias_table=table, rel_bias_lut=lut,
                                  backend="triton")  # fmt: skip
        return (o * o).sum()

    eager, comp = _leaves(tensors), _leaves(tensors)
    f(*eager).backward()
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(*comp).backward()
    for name, got, want in zip(NAMES, _grads(comp), _grads(eager), strict=True):
        assert_close(got, want, name=f"d{name}", atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------ the CUDA op's autograd logic


def test_recompute_autograd_and_reference_fallback(device, monkeypatch):
    """`_register_attention_recompute_autograd` (what fastenc_cuda::attention gets) on a stand-in op whose forward is
    the reference: the fused backward where Triton runs, the reference vjp where it cannot (a reason is given)."""
    name = "fastenc_test::attention_bwd_standin"
    if not hasattr(torch.ops, "fastenc_test") or not hasattr(torch.ops.fastenc_test, "attention_bwd_standin"):

        @torch.library.custom_op(name, mutates_args=())
        def standin(
            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
            bias: torch.Tensor | None, rel_bias_table: torch.Tensor | None, rel_bias_lut: torch.Tensor | None,
            causal: bool, scale: float,
        ) -> torch.Tensor:  # fmt: skip
            return attention_reference(q, k, v, key_padding_mask, bias, rel_bias_table, rel_bias_lut, causal=causal,
                                       scale=scale)  # fmt: skip

        standin.register_fake(lambda q, *a: torch.empty_like(q))
        register_recompute_autograd(name, fallback=_library._references()["attention"])
    op = torch.ops.fastenc_test.attention_bwd_standin.default
    tensors, mask, lut = _inputs(2, 2, 13, 13, 32, kpm="random", bias=(1, 2, 13, 13), rel=(8, 20), device=device)
    grad_out = torch.randn(2, 2, 13, 32, device=device)
    ref = _leaves(tensors)
    _reference(ref, mask, lut, True, grad_out)
    for unsupported in (False, True):
        if unsupported:
            monkeypatch.setattr(K, "attention_unsupported_reason", lambda *a: "pretend Triton cannot run")
        leaves = _leaves(tensors)
        with fastenc.trace() as t:
            op(*leaves[:3], mask, leaves[3], leaves[4], lut, True, 32**-0.5).backward(grad_out)
        assert t.counts["triton.attention_backward"] == (0 if unsupported else 1)
        for nm, got, want in zip(NAMES, _grads(leaves), _grads(ref), strict=True):
            assert_close(got, want, name=f"d{nm} unsupported={unsupported}", **FP32_TOL)


# ------------------------------------------------------------------------------------ CUDA autotune candidates


# (kernel, head dim, config, flags) measured to spill on sm_90a or sm_80 under Triton 3.9 (the NOTE next to
# BWD_CUDA_CONFIGS): the autotuner must never be able to select them
BWD_SPILLING = [
    ("dkdv", 64, (32, 64, 8, 2), {"HAS_BIAS": True}),
    ("dkdv", 64, (32, 64, 8, 2), {"HAS_RELBIAS": True}),
    ("dkdv", 64, (64, 64, 4, 2), {}),
    ("dkdv", 64, (32, 128, 8, 2), {}),
    ("dkdv", 128, (32, 64, 4, 2), {}),
    ("dkdv", 80, (32, 128, 8, 2), {}),
    ("dq", 64, (64, 64, 4, 2), {"HAS_BIAS": True}),
    ("dq", 64, (64, 64, 8, 2), {}),
]


@pytest.mark.parametrize("kernel, d, config, flags", BWD_SPILLING, ids=lambda x: str(x))
def test_bwd_spilling_configs_cannot_be_selected(kernel, d, config, flags):
    block_d = max(16, 1 << (d - 1).bit_length())
    prune = K._prune_bwd_configs(kernel)
    for bucket in (32, 128, 1024, 8192):
        kept = prune(K.attention_bwd_cuda_configs(kernel), {"SEQ_BUCKET": bucket}, BLOCK_D=block_d, **flags)
        got = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}
        assert kept and config not in got, (bucket, sorted(got))


@pytest.mark.parametrize("kernel", ["dkdv", "dq"])
def test_bwd_cuda_configs_are_valid(kernel):
    """Every pruned candidate list is non-empty, holds only its head-dim class's configs and tiles >= 16."""
    configs = K.attention_bwd_cuda_configs(kernel)
    prune = K._prune_bwd_configs(kernel)
    for block_d in (16, 32, 64, 128, 256):
        for bucket in (1, 16, 128, 1024, 8192):
            d_class = 64 if block_d <= 64 else 128 if block_d <= 128 else 256
            for flags in ({}, {"HAS_BIAS": True}, {"HAS_RELBIAS": True}):
                kept = prune(configs, {"SEQ_BUCKET": bucket}, BLOCK_D=block_d, **flags)
                assert kept, (block_d, bucket, flags)
                for c in kept:
                    cfg = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                    assert cfg in K.BWD_CUDA_CONFIGS[kernel][d_class], (c, flags)
                    assert c.kwargs["BLOCK_M"] >= 16 and c.kwargs["BLOCK_N"] >= 16, c

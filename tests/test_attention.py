"""fastenc.ops.attention on the Triton backend (the interpreter on CPU) against `attention_reference`.

Every call goes through the op with backend="triton", strict=True, and `fastenc.trace()` must show that the kernel
ran (no silent fall-back to torch).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from utils import assert_close, assert_error_within

import fastenc
from fastenc.ops.reference import attention_reference

FP32_TOL = {"atol": 1e-5, "rtol": 1e-4}


def _qkv(b, h, sq, sk, d, dtype=torch.float32, device="cpu", packed=False):
    """q: (B, H, Sq, D), k, v: (B, H, Sk, D). packed: views of one fused (B, S, 3, H, D) projection output."""
    if packed:
        assert sq == sk
        qkv = torch.randn(b, sq, 3, h, d, dtype=dtype, device=device)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, S, D), strides (S*3*H*D, D, 3*H*D, 1)
    q = torch.randn(b, h, sq, d, dtype=dtype, device=device)
    k = torch.randn(b, h, sk, d, dtype=dtype, device=device)
    v = torch.randn(b, h, sk, d, dtype=dtype, device=device)
    return q, k, v


def _kpm(b, sk, device, kind):
    """(B, Sk) bool, True = attend. "sparse": row 0 keeps one key; "empty": row 0 keeps none; "random": ~70%."""
    if kind is None:
        return None
    m = torch.rand(b, sk, device=device) > 0.3
    m[:, 0] = True  # every row keeps at least one key, except as set for row 0 below
    if kind == "sparse":
        m[0] = False
        m[0, sk // 2] = True
    elif kind == "empty":
        m[0] = False
    return m


def _bias(b, h, sq, sk, device, kind):
    shapes = {None: None, "1h": (1, h, sq, sk), "b1": (b, 1, sq, sk), "bh": (b, h, sq, sk), "row": (1, 1, 1, sk)}
    shape = shapes[kind]
    return None if shape is None else torch.randn(shape, device=device)


def _run(q, k, v, **kw):
    """The op through the Triton kernel; asserts the kernel ran exactly once."""
    with fastenc.trace() as t:
        out = fastenc.ops.attention(q, k, v, backend="triton", strict=True, **kw)
    assert t.counts["triton.attention"] == 1, dict(t.counts)
    assert not t.fallbacks
    return out


# (B, H, Sq, Sk, D, causal, key_padding_mask kind, bias kind); not a full product: the interpreter is slow
FP32_CASES = [
    (1, 1, 1, 1, 32, False, None, None),
    (1, 1, 1, 1, 64, True, "random", None),
    (3, 2, 13, 13, 40, True, "random", None),
    (1, 2, 77, 77, 64, True, None, None),
    (3, 1, 100, 100, 59, False, "random", None),
    (1, 2, 100, 100, 80, True, "sparse", "1h"),
    (3, 2, 5, 33, 104, False, None, "b1"),
    (2, 2, 77, 77, 128, False, "empty", "b1"),
    (1, 1, 13, 13, 111, True, None, "bh"),
    (3, 2, 17, 17, 32, False, "sparse", "row"),
    (2, 1, 33, 5, 72, False, "random", "1h"),
]


@pytest.mark.parametrize("b, h, sq, sk, d, causal, kpm, bias", FP32_CASES, ids=lambda x: str(x))
def test_fp32_matches_reference(b, h, sq, sk, d, causal, kpm, bias, device):
    q, k, v = _qkv(b, h, sq, sk, d, device=device)
    mask = _kpm(b, sk, device, kpm)
    bias_t = _bias(b, h, sq, sk, device, bias)
    out = _run(q, k, v, causal=causal, key_padding_mask=mask, bias=bias_t)
    ref = attention_reference(q, k, v, mask, bias_t, causal=causal)
    assert out.dtype == q.dtype and out.shape == (b, h, sq, d)
    assert_close(out, ref, name="out", **FP32_TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_masked_rows_are_zero(causal, device):
    """One key kept (row 0), none kept (row 1); with causal, the queries before the kept key see nothing."""
    b, h, s, d = 3, 2, 37, 64
    q, k, v = _qkv(b, h, s, s, d, device=device)
    mask = torch.ones(b, s, dtype=torch.bool, device=device)
    mask[0] = False
    mask[0, 20] = True
    mask[1] = False
    mask[2, 5:] = False
    bias_t = torch.randn(1, h, s, s, device=device)
    out = _run(q, k, v, causal=causal, key_padding_mask=mask, bias=bias_t)
    ref = attention_reference(q, k, v, mask, bias_t, causal=causal)
    assert_close(out, ref, name="out", **FP32_TOL)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # every key masked: exactly 0
    if causal:
        assert torch.equal(out[0, :, :20], torch.zeros_like(out[0, :, :20]))
        torch.testing.assert_close(out[0, :, 20:], v[0, :, 20:21].expand(-1, s - 20, -1), atol=0, rtol=0)
    else:
        torch.testing.assert_close(out[0], v[0, :, 20:21].expand(-1, s, -1), atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, finfo.min * log2(e)
def test_bias_masks_like_the_reference(device):
    """-inf in the bias masks a key; a finfo.min additive mask (HF style) behaves as in the reference."""
    b, h, s, d = 2, 2, 21, 32
    q, k, v = _qkv(b, h, s, s, d, device=device)
    bias_t = torch.zeros(b, 1, s, s, device=device)
    bias_t[0, :, :, 3:] = float("-inf")
    bias_t[1, :, :, ::2] = torch.finfo(torch.float32).min
    bias_t[1, :, 4] = torch.finfo(torch.float32).min  # whole row: uniform over the keys, as the reference
    out = _run(q, k, v, bias=bias_t)
    assert_close(out, attention_reference(q, k, v, None, bias_t), name="out", **FP32_TOL)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_row_masked_by_an_all_inf_bias_is_zero(backend, device):
    """A query row whose bias is -inf for every key (no key_padding_mask) gives 0 on every backend, never NaN."""
    b, h, s, d = 1, 2, 9, 16
    q, k, v = _qkv(b, h, s, s, d, device=device)
    bias_t = torch.zeros(b, h, s, s, device=device)
    bias_t[:, :, 2] = float("-inf")
    out = fastenc.ops.attention(q, k, v, bias=bias_t, backend=backend)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    keep = torch.arange(s, device=device) != 2
    assert_close(out[:, :, keep], attention_reference(q, k, v)[:, :, keep], name="other rows", **FP32_TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_large_logits_are_stable(causal, device):
    """Scores in the hundreds: the running max keeps exp2 in range across key tiles (no inf/NaN)."""
    b, h, s, d = 2, 2, 50, 64
    q, k, v = _qkv(b, h, s, s, d, device=device)
    q = q * 30.0
    mask = _kpm(b, s, device, "random")
    out = _run(q, k, v, causal=causal, key_padding_mask=mask)
    assert_close(out, attention_reference(q, k, v, mask, None, causal=causal), name="out", atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_packed_qkv_views_and_output_layout(causal, device):
    b, h, s, d = 2, 3, 29, 40
    q, k, v = _qkv(b, h, s, s, d, device=device, packed=True)
    assert not q.is_contiguous()
    mask = _kpm(b, s, device, "random").to(torch.int32)  # 0/1 integers are accepted too
    out = _run(q, k, v, causal=causal, key_padding_mask=mask, scale=1.0)  # T5: no scaling
    ref = attention_reference(q, k, v, mask.bool(), None, causal=causal, scale=1.0)
    assert_close(out, ref, name="out", **FP32_TOL)
    assert out.transpose(1, 2).is_contiguous()  # (B, S, H, D) buffer
    merged = out.transpose(1, 2).reshape(b, s, h * d)
    assert merged.data_ptr() == out.data_ptr()  # the caller's reshape is a view


def test_last_dim_not_contiguous(device):
    b, h, s, d = 1, 2, 19, 32
    q, k, v = (torch.randn(b, h, d, s, device=device).transpose(-1, -2) for _ in range(3))  # stride(-1) == S
    out = _run(q, k, v)
    assert_close(out, attention_reference(q, k, v), name="out", **FP32_TOL)


def test_empty_keys_give_zero(device):
    q = torch.randn(2, 1, 3, 32, device=device)
    k = v = torch.randn(2, 1, 0, 32, device=device)
    out = _run(q, k, v)
    assert torch.equal(out, torch.zeros_like(out))


def _naive_low_precision(q, k, v, mask, bias, causal, scale):
    """PyTorch attention computed entirely in q.dtype: the baseline of flash-attention's error rule."""
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(q.dtype)
    keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device)
    if causal:
        keep = keep.tril()
    if mask is not None:
        keep = keep & mask[:, None, None, :]
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
    return p @ v


LOW_CASES = [
    (2, 2, 77, 77, 64, True, "random", None),
    (2, 2, 100, 100, 59, False, "sparse", "1h"),
    (3, 1, 13, 13, 128, True, "empty", "b1"),
    (2, 2, 5, 33, 80, False, None, None),
]


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 1e-4), (torch.bfloat16, 1e-3)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("b, h, sq, sk, d, causal, kpm, bias", LOW_CASES, ids=lambda x: str(x))
def test_low_precision_error_rule(dtype, atol, b, h, sq, sk, d, causal, kpm, bias, device):
    """flash-attention's rule: error vs the fp32 reference <= 2x PyTorch's own error in `dtype` (+ atol)."""
    q, k, v = _qkv(b, h, sq, sk, d, device=device)
    mask = _kpm(b, sk, device, kpm)
    bias_t = _bias(b, h, sq, sk, device, bias)
    ql, kl, vl = q.to(dtype), k.to(dtype), v.to(dtype)
    out = _run(ql, kl, vl, causal=causal, key_padding_mask=mask, bias=bias_t)
    assert out.dtype == dtype
    ref = attention_reference(ql.float(), kl.float(), vl.float(), mask, bias_t, causal=causal)
    base = _naive_low_precision(ql, kl, vl, mask, bias_t, causal, d**-0.5)
    assert torch.isfinite(out.float()).all()
    assert_error_within(out, base, ref, factor=2.0, atol=atol, name=f"out {dtype}")


@pytest.mark.parametrize("causal, kpm, bias", [(False, "random", "1h"), (True, "sparse", None)])
def test_gradients_match_reference(causal, kpm, bias, device):
    """Forward through the kernel, backward through the registered op's reference vjp: grads equal the reference's."""
    b, h, s, d = 2, 2, 23, 40
    q, k, v = _qkv(b, h, s, s, d, device=device)
    mask = _kpm(b, s, device, kpm)
    bias_t = _bias(b, h, s, s, device, bias)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([bias_t.clone().requires_grad_()] if bias else [])
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    grad_out = torch.randn(b, h, s, d, device=device)

    out = _run(*leaves[:3], causal=causal, key_padding_mask=mask, bias=leaves[3] if bias else None)
    ref = attention_reference(*ref_leaves[:3], mask, ref_leaves[3] if bias else None, causal=causal)
    assert_close(out, ref, name="out", **FP32_TOL)
    out.backward(grad_out)
    ref.backward(grad_out)
    for name, got, want in zip("qkvb", leaves, ref_leaves, strict=False):
        assert_close(got.grad, want.grad, name=f"d{name}", **FP32_TOL)


def test_head_dim_too_large(device, monkeypatch):
    from fastenc.core import trace as _trace
    from fastenc.kernels.attention import attention_unsupported_reason

    q, k, v = _qkv(1, 1, 4, 4, 512, device=device)
    reason = attention_unsupported_reason(q, k, v, None)
    assert reason is not None and "512" in reason
    assert attention_unsupported_reason(*_qkv(1, 1, 4, 4, 256, device=device), None) is None

    with pytest.raises(fastenc.BackendUnavailableError, match="512"):
        fastenc.ops.attention(q, k, v, backend="triton", strict=True)

    monkeypatch.setattr(_trace, "_warned", set())  # the fall-back warning is once per process
    with fastenc.trace() as t, pytest.warns(fastenc.FallbackWarning, match="512"):
        out = fastenc.ops.attention(q, k, v, backend="triton", strict=False)
    assert t.counts["torch.attention"] == 1 and t.counts["triton.attention"] == 0
    assert_close(out, attention_reference(q, k, v), name="out", **FP32_TOL)


def test_cuda_configs_are_valid():
    """The autotune candidates can be checked without a GPU: every pruned list is non-empty and tiles divide."""
    from fastenc.kernels.attention import CUDA_CONFIGS, _prune_configs, attention_cuda_configs

    configs = attention_cuda_configs()
    variants = [{}, {"HAS_BIAS": True}, {"HAS_RELBIAS": True}, {"HAS_BIAS": True, "HAS_RELBIAS": True}]
    for block_d, bucket, flags in itertools.product((16, 32, 64, 128, 256), (1, 16, 128, 1024, 8192), variants):
        kept = _prune_configs(configs, {"SEQ_BUCKET": bucket}, BLOCK_D=block_d, **flags)
        assert kept, (block_d, bucket, flags)
        if block_d <= 128:  # never the catch-all first config of another class
            d_class = 64 if block_d <= 64 else 128
            for c in kept:
                assert (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in CUDA_CONFIGS[d_class]
        for c in kept:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            assert bm % bn == 0 and bn >= 16 and bm <= max(32, bucket), c


# (head dim, config, variant flags) measured to spill registers on sm_90a under Triton 3.6 or 3.9 (stack bytes in the
# NOTE next to CUDA_CONFIGS): the autotuner must never be able to select them.
SPILLING = [
    (64, (128, 64, 4, 3), {}),
    (80, (128, 32, 4, 3), {}),
    (128, (128, 32, 4, 3), {}),
    (80, (32, 32, 4, 2), {}),
    (80, (64, 64, 4, 3), {"HAS_BIAS": True}),
    (80, (128, 64, 8, 3), {"HAS_BIAS": True}),
    (80, (64, 64, 4, 3), {"HAS_BIAS": True, "HAS_RELBIAS": True}),
    (128, (128, 64, 8, 3), {"HAS_RELBIAS": True}),
    (128, (64, 64, 4, 3), {"HAS_RELBIAS": True}),
    (64, (128, 32, 4, 3), {"HAS_BIAS": True}),
]


@pytest.mark.parametrize("d, config, flags", SPILLING, ids=lambda x: str(x))
def test_spilling_configs_cannot_be_selected(d, config, flags):
    from fastenc.kernels.attention import _prune_configs, attention_cuda_configs

    block_d = max(16, 1 << (d - 1).bit_length())
    for bucket in (32, 128, 1024, 8192):
        kept = _prune_configs(attention_cuda_configs(), {"SEQ_BUCKET": bucket}, BLOCK_D=block_d, **flags)
        got = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}
        assert kept and config not in got, (bucket, sorted(got))


# ------------------------------------------------------------------------------------ NaN / inf inputs stay visible

NAN, INF = float("nan"), float("inf")
SPECIAL_ROW, SPECIAL_KEY = 5, 3  # query row / key the special value is put at; key 3 <= row 5: seen under causal


def _special_case(where, value, masks, device, dtype=torch.float32):
    """(q, k, v, kw for the op, keep (B, 1|H, Sq, Sk) bool or None, bias incl. the T5 bias (fp32) or None) with one
    NaN / inf in `where` (q, k, v, additive bias, relative-bias table) at SPECIAL_ROW / SPECIAL_KEY of head 1, in
    both batches. masks: "none", "causal", "kpm", "causal+kpm". The key-padding mask keeps SPECIAL_KEY in batch 0
    and masks it in batch 1, which keeps key 15 only: with causal, batch 1 rows 0-14 have every key masked."""
    b, h, s, d = 2, 2, 20, 16
    q, k, v = _qkv(b, h, s, s, d, device=device)
    kw = {}
    if where == "q":
        q[:, 1, SPECIAL_ROW, 3] = value
    elif where == "k":
        k[:, 1, SPECIAL_KEY, 2] = value
    elif where == "v":
        v[:, 1, SPECIAL_KEY, 2] = value
    elif where == "bias":
        kw["bias"] = torch.randn(b, h, s, s, device=device)
        kw["bias"][:, 1, SPECIAL_ROW, SPECIAL_KEY] = value
    elif where == "rel":  # the bucket of distance j - i = SPECIAL_KEY - SPECIAL_ROW, head 1
        table, lut = _rel_inputs(h, s, s, 8, 20, device)
        table[lut[SPECIAL_KEY - SPECIAL_ROW + s - 1], 1] = value
        kw.update(rel_bias_table=table, rel_bias_lut=lut, scale=1.0)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    kw["causal"] = "causal" in masks
    keep = torch.ones(1, 1, s, s, dtype=torch.bool, device=device).tril() if kw["causal"] else None
    if "kpm" in masks:
        kpm = torch.ones(b, s, dtype=torch.bool, device=device)
        kpm[0, [7, 11]] = False
        kpm[1] = False
        kpm[1, 15] = True
        kw["key_padding_mask"] = kpm
        keep = kpm[:, None, None, :] if keep is None else keep & kpm[:, None, None, :]
    bias = kw.get("bias")
    if where == "rel":
        from fastenc.ops.reference import relative_bias_reference

        bias = relative_bias_reference(kw["rel_bias_table"], kw["rel_bias_lut"], s, s)
    return q, k, v, kw, keep, bias


def _fp64_references(q, k, v, keep, bias, scale):
    """(strict, loose, dead) in fp64. Scores s = scale q.k + bias, masked keys -inf (by select); rows whose scores are
    all -inf are dead and give 0 (torch's _safe_softmax, SDPA's math path). strict: masked keys contribute nothing;
    loose: o = p @ v, where 0 * (NaN / inf in v at a masked key) is NaN, as in SDPA's math path. A kernel's
    non-finite outputs must include strict's and lie within loose's (they differ only for NaN / inf in v)."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.double()
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    dead = (s == float("-inf")).all(-1, keepdim=True)  # (B, H, Sq, 1)
    p = torch.softmax(s, -1).masked_fill(dead, 0.0)
    attended = (s != float("-inf"))[..., None]  # (B, H, Sq, Sk, 1); NaN scores count as attended
    strict = torch.where(attended, p[..., None] * v.double()[:, :, None], 0.0).sum(-2)
    loose = (p @ v.double()).masked_fill(dead, 0.0)
    return strict, loose, dead


def _check_nonfinite(out, q, k, v, keep, bias, scale, value, atol=1e-5, rtol=1e-4):
    strict, loose, dead = _fp64_references(q, k, v, keep, bias, scale)
    got = out.double()
    bad, must, may = ~torch.isfinite(got), ~torch.isfinite(strict), ~torch.isfinite(loose)
    assert must.any(), "the special value reaches no output: the case tests nothing"
    missing = must & ~bad
    assert not missing.any(), f"finite output where the fp64 reference is not, first at {missing.nonzero()[0].tolist()}"
    extra = bad & ~may
    assert not extra.any(), f"non-finite output where the fp64 reference is finite, at {extra.nonzero()[0].tolist()}"
    if value != value:  # NaN in: every non-finite output is NaN
        assert torch.equal(got.isnan(), bad)
    dead_out = got.masked_select(dead.expand_as(got))
    assert (dead_out == 0).all(), "rows with every key masked must give exactly 0"
    assert_close(got[~may], strict[~may], name="finite outputs", atol=atol, rtol=rtol)


SPECIAL_VALUES = [("q", NAN), ("q", INF), ("q", -INF), ("k", NAN), ("k", INF), ("k", -INF), ("v", NAN), ("v", INF),
                  ("v", -INF), ("bias", NAN), ("bias", INF), ("rel", NAN), ("rel", INF)]  # fmt: skip


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy: inf - inf, 0 * inf
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # numpy: tl.max of a NaN row
@pytest.mark.parametrize("masks", ["none", "causal", "kpm", "causal+kpm"])
@pytest.mark.parametrize("where, value", SPECIAL_VALUES, ids=lambda x: str(x))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_and_inf_inputs_are_not_hidden(backend, where, value, masks, device):
    """NaN / inf in q, k, v, the bias or the T5 table reach the rows that see them, as in SDPA (a finite row here
    would hide e.g. an fp16 overflow upstream); a NaN / inf at a masked key or row does not leak, and rows with every
    key masked still give exactly 0. Checked against fp64 references, and against SDPA itself when no mask is set."""
    q, k, v, kw, keep, bias = _special_case(where, value, masks, device)
    scale = kw.get("scale", q.shape[-1] ** -0.5)
    if backend == "triton":
        out = _run(q, k, v, **kw)
    else:
        out = fastenc.ops.attention(q, k, v, backend="torch", **kw)
    _check_nonfinite(out, q, k, v, keep, bias, scale, value)
    if masks == "none":  # the fp64 reference's non-finite pattern is SDPA's
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q.double(), k.double(), v.double(), attn_mask=None if bias is None else bias.double(), scale=scale
        )
        strict, _, _ = _fp64_references(q, k, v, keep, bias, scale)
        assert torch.equal(torch.isfinite(sdpa), torch.isfinite(strict))
        assert torch.equal(sdpa.isnan(), strict.isnan())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("where, value", [("q", INF), ("k", NAN), ("rel", INF)], ids=lambda x: str(x))
def test_low_precision_overflow_is_not_hidden(dtype, where, value, device):
    """An fp16 / bf16 projection that overflowed to inf (or NaN) must not come out of attention as finite numbers."""
    q, k, v, kw, keep, bias = _special_case(where, value, "causal+kpm", device, dtype=dtype)
    out = _run(q, k, v, **kw)
    assert out.dtype == dtype
    _check_nonfinite(out, q, k, v, keep, bias, kw.get("scale", q.shape[-1] ** -0.5), value, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------ relative-position bias (T5)


def _hf_buckets(sq, sk, bidirectional, num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(sk)[None, :] - torch.arange(sq)[:, None]  # (Sq, Sk), memory - context as compute_bias
    return T5Attention._relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (32, 20), (8, 20), (8, 128), (16, 7), (64, 1000)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance, bidirectional):
    from fastenc.ops.reference import relative_position_buckets

    for sq, sk in [(1, 1), (2, 2), (13, 13), (100, 100), (7, 100), (100, 7), (600, 600), (1000, 1000)]:
        lut = relative_position_buckets(
            sq, sk, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
        )
        assert lut.dtype == torch.int32 and lut.shape == (sq + sk - 1,)
        idx = torch.arange(sk)[None, :] - torch.arange(sq)[:, None] + sq - 1
        want = _hf_buckets(sq, sk, bidirectional, num_buckets, max_distance)
        assert torch.equal(lut.long()[idx], want), (sq, sk)


def _rel_inputs(h, sq, sk, num_buckets, max_distance, device, table_dtype=torch.float32):
    from fastenc.ops.reference import relative_position_buckets

    table = (torch.randn(num_buckets, h, device=device) * 2).to(table_dtype)
    lut = relative_position_buckets(sq, sk, num_buckets=num_buckets, max_distance=max_distance, device=device)
    return table, lut


# (B, H, Sq, Sk, D, num_buckets, max_distance, key_padding_mask kind, extra bias kind)
REL_CASES = [
    (1, 1, 1, 1, 16, 32, 128, None, None),
    (2, 2, 13, 13, 48, 32, 20, "random", None),
    (2, 3, 100, 100, 64, 8, 20, "sparse", None),
    (1, 2, 37, 29, 16, 32, 128, "random", "1h"),
    (2, 1, 5, 70, 32, 32, 20, "empty", None),
    (1, 2, 300, 300, 64, 32, 128, "random", None),
]


@pytest.mark.parametrize("b, h, sq, sk, d, nb, md, kpm, bias", REL_CASES, ids=lambda x: str(x))
def test_relative_bias_matches_reference(b, h, sq, sk, d, nb, md, kpm, bias, device):
    q, k, v = _qkv(b, h, sq, sk, d, device=device)
    mask = _kpm(b, sk, device, kpm)
    bias_t = _bias(b, h, sq, sk, device, bias)
    table, lut = _rel_inputs(h, sq, sk, nb, md, device)
    out = _run(q, k, v, key_padding_mask=mask, bias=bias_t, scale=1.0, rel_bias_table=table, rel_bias_lut=lut)
    ref = attention_reference(q, k, v, mask, bias_t, table, lut, scale=1.0)
    # the reference as transformers writes it: the (1, H, Sq, Sk) bias from its own bucket function
    hf_bias = table[_hf_buckets(sq, sk, True, nb, md)].permute(2, 0, 1).unsqueeze(0)
    full = hf_bias if bias_t is None else hf_bias + bias_t
    assert_close(ref, attention_reference(q, k, v, mask, full, scale=1.0), name="reference", atol=1e-6, rtol=1e-6)
    assert_close(out, ref, name="out", atol=2e-5, rtol=1e-4)


def test_relative_bias_is_not_materialised_on_triton(device, monkeypatch):
    """The Triton path never builds the (Sq, Sk) bias: the reference's materialiser is not called."""
    import sys

    attention_mod = sys.modules["fastenc.ops.attention"]  # the module; fastenc.ops.attention is the function

    def boom(*args, **kwargs):
        raise AssertionError("relative bias materialised")

    q, k, v = _qkv(1, 2, 40, 40, 32, device=device)
    table, lut = _rel_inputs(2, 40, 40, 32, 128, device)
    ref = attention_reference(q, k, v, None, None, table, lut, scale=1.0)
    monkeypatch.setattr(attention_mod, "relative_bias_reference", boom)
    out = _run(q, k, v, scale=1.0, rel_bias_table=table, rel_bias_lut=lut)
    assert_close(out, ref, name="out", **FP32_TOL)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 1e-4), (torch.bfloat16, 1e-3)], ids=["fp16", "bf16"])
def test_relative_bias_low_precision_error_rule(dtype, atol, device):
    from fastenc.ops.reference import relative_bias_reference

    b, h, s, d = 2, 2, 77, 64
    q, k, v = (t * 0.5 for t in _qkv(b, h, s, s, d, device=device))
    mask = _kpm(b, s, device, "random")
    table, lut = _rel_inputs(h, s, s, 32, 128, device, table_dtype=dtype)  # a model-dtype table
    ql, kl, vl = q.to(dtype), k.to(dtype), v.to(dtype)
    out = _run(ql, kl, vl, key_padding_mask=mask, scale=1.0, rel_bias_table=table, rel_bias_lut=lut)
    assert out.dtype == dtype
    ref = attention_reference(ql.float(), kl.float(), vl.float(), mask, None, table.float(), lut, scale=1.0)
    base = _naive_low_precision(ql, kl, vl, mask, relative_bias_reference(table, lut, s, s), False, 1.0)
    assert torch.isfinite(out.float()).all()
    assert_error_within(out, base, ref, factor=2.0, atol=atol, name=f"out {dtype}")


def test_relative_bias_gradients_reach_the_table(device):
    b, h, s, d = 2, 2, 21, 16
    q, k, v = _qkv(b, h, s, s, d, device=device)
    table, lut = _rel_inputs(h, s, s, 8, 20, device)
    t1, t2 = table.clone().requires_grad_(), table.clone().requires_grad_()
    q1, q2 = q.clone().requires_grad_(), q.clone().requires_grad_()
    out = _run(q1, k, v, scale=1.0, rel_bias_table=t1, rel_bias_lut=lut)
    ref = attention_reference(q2, k, v, None, None, t2, lut, scale=1.0)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    assert_close(t1.grad, t2.grad, name="dtable", **FP32_TOL)
    assert_close(q1.grad, q2.grad, name="dq", **FP32_TOL)


def test_relative_bias_input_errors(device):
    q, k, v = _qkv(1, 2, 10, 10, 16, device=device)
    table, lut = _rel_inputs(2, 10, 10, 32, 128, device)
    bad = {
        "together": dict(rel_bias_table=table),
        "lut length": dict(rel_bias_table=table, rel_bias_lut=lut[:-1]),
        "heads": dict(rel_bias_table=table[:, :1], rel_bias_lut=lut),
        "lut dtype": dict(rel_bias_table=table, rel_bias_lut=lut.float()),
        "table dtype": dict(rel_bias_table=table.long(), rel_bias_lut=lut),
        "range": dict(rel_bias_table=table[:4], rel_bias_lut=lut),
    }
    for name, kw in bad.items():
        with pytest.raises(fastenc.InputError):
            fastenc.ops.attention(q, k, v, scale=1.0, **kw)
            pytest.fail(name)

"""fastenc.ops.cosine_similarity_matrix and fastenc.ops.topk_cosine on the torch and Triton (interpreter on CPU)
backends against the formula and torch.topk on the full matrix; ties, zero rows and input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from utils import assert_close, assert_error_within

import fastenc
from fastenc.ops.reference import cosine_similarity_reference

BACKENDS = ["torch", "triton"]


def _cos(a, b, backend, **kw):
    with fastenc.trace() as t:
        out = fastenc.ops.cosine_similarity_matrix(a, b, backend=backend, strict=True, **kw)
    assert t.counts[f"{backend}.cosine_similarity_matrix"] == 1, dict(t.counts)
    assert not t.fallbacks
    return out


def _topk(q, g, k, backend, **kw):
    with fastenc.trace() as t:
        out = fastenc.ops.topk_cosine(q, g, k, backend=backend, strict=True, **kw)
    assert t.counts[f"{backend}.topk_cosine"] == 1, dict(t.counts)
    return out


# (M, N, d): awkward sizes, M != N, a single row, d below one K tile and spanning several
SHAPES = [(1, 1, 8), (3, 37, 33), (37, 3, 64), (130, 37, 8), (17, 130, 33)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m, n, d", SHAPES, ids=lambda x: str(x))
def test_fp32_matches_formula(backend, m, n, d):
    a, b = torch.randn(m, d) * 3, torch.randn(n, d)
    out = _cos(a, b, backend, scale=2.5)
    want = 2.5 * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    assert out.dtype == torch.float32
    assert_close(out, want, atol=1e-6, rtol=1e-5, name="cosine")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_formula(backend):
    a, b = torch.randn(9, 33, requires_grad=True), torch.randn(20, 33, requires_grad=True)
    w = torch.randn(9, 20)
    got = torch.autograd.grad((_cos(a, b, backend, scale=2.0) * w).sum(), (a, b))
    want = torch.autograd.grad((2.0 * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T * w).sum(), (a, b))
    for name, g, r in zip(["d_a", "d_b"], got, want, strict=True):
        assert_close(g, r, atol=1e-6, rtol=1e-5, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows_give_zero(backend):
    a, b = torch.randn(20, 33), torch.randn(18, 33)
    a[3], b[0], b[17] = 0, 0, 0
    out = _cos(a, b, backend)
    assert torch.isfinite(out).all()
    assert (out[3] == 0).all() and (out[:, 0] == 0).all() and (out[:, 17] == 0).all()
    assert_close(out, cosine_similarity_reference(a, b), atol=1e-6, rtol=1e-5, name="cosine")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_error_within_2x_of_torch(backend, dtype):
    a, b = torch.randn(37, 64).to(dtype), torch.randn(45, 64).to(dtype)
    ref = 3.0 * F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T
    base = 3.0 * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T  # PyTorch in dtype
    out = _cos(a, b, backend, scale=3.0)
    assert out.dtype == dtype
    assert_error_within(out, base, ref, factor=2, atol=1e-6, name="cosine")


TOPK_CASES = [(1, 1, 8, 1, 4), (5, 37, 33, 1, 8), (7, 37, 33, 10, 16), (3, 130, 64, 130, 37), (13, 50, 8, 20, 50),
              (4, 33, 16, 7, 1)]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q, g, d, k, chunk", TOPK_CASES, ids=lambda x: str(x))
def test_topk_matches_torch_topk(backend, q, g, d, k, chunk):
    queries, gallery = torch.randn(q, d), torch.randn(g, d)  # continuous: distinct similarities
    values, indices = _topk(queries, gallery, k, backend, chunk_size=chunk)
    full = cosine_similarity_reference(queries, gallery)
    want_v, want_i = torch.topk(full, k, dim=1)
    assert values.shape == (q, k) and indices.dtype == torch.int64
    assert torch.equal(indices, want_i)
    assert_close(values, want_v, atol=1e-6, rtol=1e-5, name="values")


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_ties_by_ascending_index(backend):
    """Exactly equal similarities come out in ascending gallery index, across chunks. Rows have four +-1 entries
    (norm 2), so every similarity is a sum of +-0.25 and exact whatever the summation order: ties are real."""

    def rows(n):
        x = torch.zeros(n, 16)
        for r in range(n):
            x[r, torch.randperm(16)[:4]] = torch.randint(0, 2, (4,)).float() * 2 - 1
        return x

    base = rows(6)
    gallery = torch.cat([base, base, base[:3], rows(4)])  # rows i, i + 6 (and i + 12 for i < 3) are identical
    queries = rows(4)
    queries[1] = 0  # a zero query ties every gallery row at 0
    values, indices = _topk(queries, gallery, 15, backend, chunk_size=4)
    full = cosine_similarity_reference(queries, gallery)
    want_v, want_i = torch.sort(full, dim=1, descending=True, stable=True)
    assert torch.equal(indices, want_i[:, :15])
    assert torch.equal(indices[1], torch.arange(15))
    assert torch.equal(values, want_v[:, :15])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_topk_half_values(dtype):
    queries, gallery = torch.randn(5, 33).to(dtype), torch.randn(40, 33).to(dtype)
    values, indices = _topk(queries, gallery, 6, "triton", chunk_size=16)
    assert values.dtype == dtype
    full = F.normalize(queries.float(), dim=-1) @ F.normalize(gallery.float(), dim=-1).T
    assert_close(values, torch.gather(full, 1, indices), atol=1e-3, rtol=1e-2, name="values")
    assert_close(values, torch.topk(full, 6).values, atol=1e-3, rtol=1e-2, name="top values")


def _bad(fn, match):
    with pytest.raises(fastenc.InputError, match=match):
        fn()


def test_bad_inputs():
    a, b = torch.randn(4, 8), torch.randn(5, 8)
    cos, topk = fastenc.ops.cosine_similarity_matrix, fastenc.ops.topk_cosine
    _bad(lambda: cos(a, torch.randn(5, 9)), "b must have the feature dim d=8 of a")
    _bad(lambda: cos(torch.randn(8), b), "a must have 2 dims")
    _bad(lambda: cos(a, torch.ones(5, 8, dtype=torch.int32)), "b must have dtype")
    _bad(lambda: cos(a, b.half()), "b has dtype")
    _bad(lambda: cos(a, b, scale="2"), "scale")
    _bad(lambda: topk(a, torch.randn(5, 9), 2), "gallery must have the feature dim d=8 of queries")
    _bad(lambda: topk(torch.randn(8), b, 2), "queries")
    _bad(lambda: topk(a.long(), b, 2), "queries")
    _bad(lambda: topk(a, b, 6), "k must be in")
    _bad(lambda: topk(a, b, 0), "k must be in")
    _bad(lambda: topk(a, b, 2.0), "k must be an int")
    _bad(lambda: topk(a, b, 2, chunk_size=0), "chunk_size")


# (dtype, config) measured to spill registers on sm_90a under Triton 3.6 or 3.9 (NOTE at kernels/cosine.py
# CUDA_CONFIGS): never an autotune candidate for that dtype; every dtype keeps candidates.
COSINE_SPILLING = [
    (torch.float32, (128, 128, 64, 8, 3)),
    (torch.float32, (128, 64, 64, 4, 4)),
    (torch.float32, (64, 128, 64, 4, 4)),
    (torch.bfloat16, (128, 64, 64, 4, 4)),
]


@pytest.mark.parametrize("dtype, config", COSINE_SPILLING, ids=str)
def test_spilling_configs_are_not_candidates(dtype, config):
    from fastenc.kernels import cosine as kernels

    assert config not in kernels.cuda_configs(dtype)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        assert kernels.cuda_configs(dt), dt

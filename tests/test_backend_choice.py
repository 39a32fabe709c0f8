"""Backend routing for ops with a CUDA kernel, exercised on CPU by standing in for a loaded extension: which backend
`choose_backend` picks for "auto" / "cuda" on a CUDA device, the fall-back to Triton when the CUDA kernel refuses
the inputs (visible in fastenc.trace()), and strict raising. No tensor is created on CUDA; only the decision runs."""

from __future__ import annotations

import pytest
import torch

import fastenc
from fastenc.core import cuda as _cuda
from fastenc.core import dispatch as _dispatch
from fastenc.core.errors import BackendUnavailableError

CUDA = torch.device("cuda")


@pytest.fixture
def loaded_extension(monkeypatch):
    """As on a GPU machine with the extension loaded and Triton able to run on CUDA tensors."""
    monkeypatch.setattr(_cuda, "_state", {"loaded": "test stand-in"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_dispatch, "_triton_can_run", lambda device: None)
    monkeypatch.delenv(_dispatch.ENV_BACKEND, raising=False)


def _choose(backend, *, cuda_reason=None, triton_reason=None, has_cuda_kernel=True, strict=False):
    return _dispatch.choose_backend(
        "attention",
        CUDA,
        backend,
        strict,
        lambda: triton_reason,
        (lambda: cuda_reason) if has_cuda_kernel else None,
    )


def test_auto_prefers_a_loaded_cuda_kernel(loaded_extension):
    with fastenc.trace() as t:
        assert _choose("auto") == "cuda"
    assert t.counts == {"cuda.attention": 1} and not t.fallbacks


def test_cuda_refusal_falls_back_to_triton_visibly(loaded_extension):
    why = "Sk 300 > 128 (the CUDA kernel holds one head's K and V in shared memory)"
    with fastenc.trace() as t, pytest.warns(fastenc.FallbackWarning, match="Sk 300"):
        assert _choose("cuda", cuda_reason=why) == "triton"
    assert t.counts == {"triton.attention": 1}
    assert [(f.requested, f.ran, f.reason) for f in t.fallbacks] == [("cuda", "triton", why)]


def test_auto_skips_a_refusing_cuda_kernel_without_warning(loaded_extension, recwarn):
    with fastenc.trace() as t:
        assert _choose("auto", cuda_reason="fp32 is not supported") == "triton"
    assert t.counts == {"triton.attention": 1} and not t.fallbacks
    assert not [w for w in recwarn if issubclass(w.category, fastenc.FallbackWarning)]


def test_op_without_a_cuda_kernel_runs_triton(loaded_extension):
    with fastenc.trace() as t, pytest.warns(fastenc.FallbackWarning, match="no cuda kernel"):
        assert _choose("cuda", has_cuda_kernel=False) == "triton"
    assert t.counts == {"triton.attention": 1}


def test_strict_raises_instead_of_falling_back(loaded_extension):
    with pytest.raises(BackendUnavailableError, match="strict=True"):
        _choose("cuda", cuda_reason="additive bias", strict=True)


def test_both_kernels_refusing_falls_back_to_torch(loaded_extension):
    with pytest.warns(fastenc.FallbackWarning):
        assert _choose("cuda", cuda_reason="bias", triton_reason="head dim 300 > 256") == "torch"


def test_auto_never_starts_a_build(monkeypatch):
    """With no prebuilt or loaded extension, "auto" must not call the loader (a JIT build takes minutes)."""
    monkeypatch.setattr(_cuda, "_state", {})
    monkeypatch.setattr(_dispatch, "_PREBUILT_CUDA", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_dispatch, "_triton_can_run", lambda device: None)
    monkeypatch.delenv(_dispatch.ENV_BACKEND, raising=False)

    def no_build():
        raise AssertionError("auto tried to load / build the CUDA extension")

    monkeypatch.setattr(_cuda, "_first_load_reason", no_build)
    assert _choose("auto") == "triton"
    assert "cuda" not in fastenc.available_backends()

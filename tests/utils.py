"""Assertion helpers shared by the tests."""

from __future__ import annotations

import torch

import fastenc

# fp32 parity bar for whole towers against transformers (issue 2: about 1e-4 relative)
FP32 = dict(atol=2e-5, rtol=1e-4)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, name: str = "tensor"):
    """torch.testing-style closeness that reports max abs / max rel error and the first mismatching index."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().float().cpu()
    e = expected.detach().float().cpu()
    if not torch.isfinite(a).all():
        bad = (~torch.isfinite(a)).nonzero()[0].tolist()
        raise AssertionError(f"{name}: non-finite value at index {bad}: {a[tuple(bad)].item()}")
    diff = (a - e).abs()
    tol = atol + rtol * e.abs()
    bad = diff > tol
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        rel = (diff / e.abs().clamp_min(1e-12)).max().item()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements out of tolerance (atol={atol}, rtol={rtol}); "
            f"max abs err {diff.max().item():.3e}, max rel err {rel:.3e}; first mismatch at {idx}: "
            f"got {a[tuple(idx)].item():.6g}, expected {e[tuple(idx)].item():.6g}"
        )


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.detach().float() - expected.detach().float()).abs().max().item()


def assert_error_within(actual, baseline, reference, *, factor: float, atol: float, name: str = "tensor"):
    """flash-attention's rule: |actual - reference| <= factor * |baseline - reference| + atol (max-abs errors).

    reference: an fp32 computation; baseline: PyTorch's own computation in the low dtype."""
    err = max_abs_err(actual, reference)
    base = max_abs_err(baseline, reference)
    assert err <= factor * base + atol, (
        f"{name}: error vs fp32 reference {err:.3e} > {factor} x PyTorch's own error {base:.3e} + {atol:.1e}"
    )


def compare_outputs(ref, got, fmt=FP32, prefix=""):
    """Every field of two ModelOutputs (nested outputs and tuples of tensors included) close, same keys and types."""
    assert type(ref) is type(got)
    assert list(ref.keys()) == list(got.keys()), (list(ref.keys()), list(got.keys()))
    for key in ref.keys():
        r, g = ref[key], got[key]
        if isinstance(r, torch.Tensor):
            assert_close(g, r, **fmt, name=prefix + key)
        elif isinstance(r, tuple):
            assert len(r) == len(g), f"{prefix}{key}: {len(g)} items, expected {len(r)}"
            for i, (a, b) in enumerate(zip(g, r, strict=True)):
                assert (a is None) == (b is None), f"{prefix}{key}[{i}]"
                if a is not None:
                    assert_close(a, b, **fmt, name=f"{prefix}{key}[{i}]")
        elif r is None:
            assert g is None, prefix + key
        else:
            compare_outputs(r, g, fmt, prefix=f"{prefix}{key}.")


def run_both(model, fast, inputs, **kw):
    """(reference output, fastenc output, trace of the fastenc call), no grad."""
    with torch.no_grad():
        ref = model(**inputs, **kw)
        with fastenc.trace() as t:
            got = fast(**inputs, **kw)
    return ref, got, t


def count_backward_launches(monkeypatch, module, kinds) -> dict[str, int]:
    """Counts calls of `module.<kind>_backward` (the fused backward launchers; the reference path never calls them)."""
    counts = dict.fromkeys(kinds, 0)
    for kind in kinds:
        real = getattr(module, f"{kind}_backward")

        def wrapped(*a, _real=real, _kind=kind, **k):
            counts[_kind] += 1
            return _real(*a, **k)

        monkeypatch.setattr(module, f"{kind}_backward", wrapped)
    return counts

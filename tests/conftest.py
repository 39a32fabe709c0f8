"""Test setup: with no GPU, Triton kernels run under Triton's CPU interpreter. The variable must be set before
any @triton.jit is created; fastenc imports its kernels lazily, so setting it here is early enough."""

import os
import tempfile

import torch

# fastenc's caches (ONNX exports, checkpoint digests, prompt cache) go to a folder of this test session, never to
# the user's ~/.cache; tests that need their own cache folder set FASTENC_CACHE themselves.
os.environ.setdefault("FASTENC_CACHE", tempfile.mkdtemp(prefix="fastenc-test-cache-"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    return DEVICE


def _interpreter_loop_bound_problem() -> str | None:
    """Triton <= 3.6's interpreter converts a tensor loop bound with int(ndarray), which numpy >= 2.4 rejects for
    1-element arrays of rank > 0: every kernel with a computed loop bound then fails. Say so once, up front."""
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(out_ptr, n):
        hi = tl.minimum(n, 4)
        acc = 0
        for _ in range(0, hi):
            acc += 1
        tl.store(out_ptr, acc)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _probe[(1,)](out, 3)
    except Exception as e:  # noqa: BLE001 - any failure here is the interpreter's, reported below
        import numpy

        return (
            f"the Triton {triton.__version__} CPU interpreter cannot run a kernel with a computed loop bound under "
            f"numpy {numpy.__version__} ({type(e).__name__}: {e}); install numpy<2.4 or a newer triton"
        )
    return None if int(out) == 3 else f"the Triton interpreter's probe loop ran {int(out)} times instead of 3"


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available():
        problem = _interpreter_loop_bound_problem()
        if problem:
            pytest.exit(f"fastenc tests: {problem}", returncode=4)

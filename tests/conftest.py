"""Test setup: with no GPU, Triton kernels run under Triton's CPU interpreter. The variable must be set before
any @triton.jit is created; fastenc imports its kernels lazily, so setting it here is early enough."""

import os

import torch

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

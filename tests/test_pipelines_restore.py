"""`fastenc.pipelines.restore_pipeline` keeps a component the caller swapped (issue 25, section 6): after
`pipe.text_encoder = other`, and after a re-optimize of the swapped pipeline, restore puts back `other`, never the
encoder the first optimize found. Tiny SDXL pipelines (two CLIP text encoders) from tests/pipeline_utils.py."""

from __future__ import annotations

import warnings

import pytest
import torch

import fastenc
from fastenc.models._encoder import FastencModelMixin
from fastenc.pipelines import restore_pipeline

pytest.importorskip("diffusers")

from tests.pipeline_utils import _clip, make_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def _base(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_pipeline("sdxl", tmp_path_factory.mktemp("sdxl"))


@pytest.fixture
def sdxl(_base):
    """A fresh pipeline object over the module's components (each test swaps and restores its own)."""
    pipe = type(_base)(**_base.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _other(pipe):
    """A second CLIP text encoder shaped like pipe.text_encoder, other weights."""
    return _clip(pipe.tokenizer, projection=False, seed=11)


def _embeds(pipe):
    with torch.no_grad():
        return pipe.encode_prompt(
            "a red cat", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )[0]


def test_restore_keeps_a_component_swapped_after_optimize(sdxl):
    te, te2 = sdxl.text_encoder, sdxl.text_encoder_2
    index = dict(sdxl.config)
    fastenc.optimize(sdxl, backend="torch")
    other = _other(sdxl)
    sdxl.text_encoder = other
    want = _embeds(sdxl)
    assert restore_pipeline(sdxl) is sdxl
    assert sdxl.text_encoder is other and sdxl.text_encoder is not te
    assert sdxl.text_encoder_2 is te2  # the component optimize swapped and nobody touched comes back
    assert dict(sdxl.config) == index
    assert torch.equal(_embeds(sdxl), want)


def test_restore_after_reoptimizing_a_swapped_pipeline_keeps_the_swap(sdxl):
    te, te2 = sdxl.text_encoder, sdxl.text_encoder_2
    fastenc.optimize(sdxl, backend="torch")
    other = _other(sdxl)
    sdxl.text_encoder = other
    fastenc.optimize(sdxl, backend="torch")  # the swap is optimized in turn, text_encoder_2 re-optimized
    fast = sdxl.text_encoder
    assert isinstance(fast, FastencModelMixin)
    assert all(p is q for p, q in zip(fast.parameters(), other.parameters(), strict=True))
    restore_pipeline(sdxl)
    assert sdxl.text_encoder is other and sdxl.text_encoder is not te
    assert sdxl.text_encoder_2 is te2


def test_restore_after_two_optimizes_gives_the_first_original(sdxl):
    te, te2 = sdxl.text_encoder, sdxl.text_encoder_2
    fastenc.optimize(sdxl, backend="torch")
    fastenc.optimize(sdxl, backend="torch", prompt_cache=True)
    restore_pipeline(sdxl)
    assert sdxl.text_encoder is te and sdxl.text_encoder_2 is te2
    assert not any(isinstance(c, FastencModelMixin) for c in sdxl.components.values())

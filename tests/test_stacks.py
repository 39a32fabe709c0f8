"""Conditioning stacks (SDXL, SD3, FLUX): shapes, and parity against composing the transformers towers by hand as
diffusers' encode_prompt does. Tiny random-weight towers with different CLIP widths so the concat widths show."""

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from fastenc.core.errors import InputError, UnsupportedModelError
from fastenc.diagnostics.stacks import flux_conditioning, sd3_conditioning, sdxl_conditioning
from tests.tokenizer_utils import build_clip_tokenizer
from tests.utils import assert_close

FP32 = dict(atol=3e-5, rtol=1e-4)
PROMPTS = ["a red cube next to a blue sphere", "two cats on a table"]
T5_VOCAB, T5_LEN = 97, 12


def clip_tower(cls, width, proj, seed, vocab):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=2,
        num_hidden_layers=3,
        max_position_embeddings=77,
        projection_dim=proj,
        eos_token_id=vocab - 1,
        bos_token_id=vocab - 2,
        pad_token_id=vocab - 1,
    )
    return cls(cfg).eval()


def t5_tower(d_model=96, seed=3):
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=T5_VOCAB,
        d_model=d_model,
        d_kv=16,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        pad_token_id=0,
    )
    return T5EncoderModel(cfg).eval()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def towers(tok):
    v = len(tok)
    return {
        "clip_1": clip_tower(CLIPTextModel, 32, 16, 0, v),
        "clip_2": clip_tower(CLIPTextModelWithProjection, 48, 24, 1, v),
        "clip_l": clip_tower(CLIPTextModelWithProjection, 32, 16, 2, v),
        "clip_l_plain": clip_tower(CLIPTextModel, 32, 16, 2, v),
        "t5": t5_tower(),
    }


def t5_ids(batch=2, length=T5_LEN):
    g = torch.Generator().manual_seed(7)
    return torch.randint(1, T5_VOCAB, (batch, length), generator=g)


def clip_ids(tok, prompts=PROMPTS):
    return tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------- by-hand references


def sdxl_by_hand(te1, te2, ids):
    with torch.no_grad():
        o1 = te1(ids, output_hidden_states=True)
        o2 = te2(ids, output_hidden_states=True)
    return torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1), o2[0]


def sd3_by_hand(cl, cg, t5, ids, ids_t5):
    with torch.no_grad():
        ol = cl(ids, output_hidden_states=True)
        og = cg(ids, output_hidden_states=True)
        t = t5(ids_t5)[0]
    clip = torch.cat([ol.hidden_states[-2], og.hidden_states[-2]], dim=-1)
    clip = F.pad(clip, (0, t.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t], dim=-2), torch.cat([ol[0], og[0]], dim=-1)


def flux_by_hand(cl, t5, ids, ids_t5):
    with torch.no_grad():
        return t5(ids_t5)[0], cl(ids).pooler_output


# ------------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("optimize", [False, True])
def test_sdxl_shapes_and_parity(towers, tok, optimize):
    te1, te2 = towers["clip_1"], towers["clip_2"]
    embeds, pooled = sdxl_conditioning(te1, te2, tok, tok, PROMPTS, optimize=optimize, backend="torch", strict=True)
    assert embeds.shape == (2, 77, 32 + 48)
    assert pooled.shape == (2, 24)
    ref_e, ref_p = sdxl_by_hand(te1, te2, clip_ids(tok))
    if optimize:
        assert_close(embeds, ref_e, **FP32)
        assert_close(pooled, ref_p, **FP32)
    else:
        assert torch.equal(embeds, ref_e) and torch.equal(pooled, ref_p)


@pytest.mark.parametrize("optimize", [False, True])
def test_sd3_shapes_and_parity(towers, tok, optimize):
    cl, cg, t5 = towers["clip_l"], towers["clip_2"], towers["t5"]
    ids5 = t5_ids()
    embeds, pooled = sd3_conditioning(
        cl, cg, t5, tok, tok, None, PROMPTS, input_ids={"t5": ids5}, optimize=optimize, backend="torch", strict=True
    )
    assert embeds.shape == (2, 77 + T5_LEN, 96)
    assert pooled.shape == (2, 16 + 24)
    assert torch.all(embeds[:, :77, 80:] == 0)  # CLIP block zero-padded from 32 + 48 to the T5 width
    ref_e, ref_p = sd3_by_hand(cl, cg, t5, clip_ids(tok), ids5)
    if optimize:
        assert_close(embeds, ref_e, **FP32)
        assert_close(pooled, ref_p, **FP32)
    else:
        assert torch.equal(embeds, ref_e) and torch.equal(pooled, ref_p)


@pytest.mark.parametrize("optimize", [False, True])
def test_flux_shapes_and_parity(towers, tok, optimize):
    cl, t5 = towers["clip_l_plain"], towers["t5"]
    ids5 = t5_ids()
    embeds, pooled = flux_conditioning(
        cl, t5, tok, None, PROMPTS, input_ids={"t5": ids5}, optimize=optimize, backend="torch", strict=True
    )
    assert embeds.shape == (2, T5_LEN, 96)
    assert pooled.shape == (2, 32)
    ref_e, ref_p = flux_by_hand(cl, t5, clip_ids(tok), ids5)
    if optimize:
        assert_close(embeds, ref_e, **FP32)
        assert_close(pooled, ref_p, **FP32)
    else:
        assert torch.equal(embeds, ref_e) and torch.equal(pooled, ref_p)


def test_sd3_triton_strict(towers, tok):
    """One stack end to end on the Triton backend (CPU interpreter in CI), strict: no silent fallback."""
    cl, cg, t5 = towers["clip_l"], towers["clip_2"], towers["t5"]
    ids = {"clip_l": clip_ids(tok, PROMPTS[:1])[:, :8], "clip_g": clip_ids(tok, PROMPTS[:1])[:, :8], "t5": t5_ids(1, 6)}
    embeds, pooled = sd3_conditioning(
        cl, cg, t5, None, None, None, None, input_ids=ids, optimize=True, backend="triton", strict=True
    )
    ref_e, ref_p = sd3_by_hand(cl, cg, t5, ids["clip_l"], ids["t5"])
    assert embeds.shape == (1, 8 + 6, 96)
    assert_close(embeds, ref_e, **FP32)
    assert_close(pooled, ref_p, **FP32)


def test_pre_tokenized_matches_tokenizer(towers, tok):
    te1, te2 = towers["clip_1"], towers["clip_2"]
    ids = clip_ids(tok)
    a = sdxl_conditioning(te1, te2, tok, tok, PROMPTS)
    b = sdxl_conditioning(te1, te2, None, None, None, input_ids={"clip_1": ids, "clip_2": ids})
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_inputs(towers, tok):
    te1, te2, t5 = towers["clip_1"], towers["clip_2"], towers["t5"]
    with pytest.raises(InputError, match="empty"):
        sdxl_conditioning(te1, te2, tok, tok, ["a cat", "  "])
    with pytest.raises(InputError, match="non-empty"):
        sdxl_conditioning(te1, te2, tok, tok, [])
    with pytest.raises(UnsupportedModelError, match="text_encoder_2"):
        sdxl_conditioning(te1, te1, tok, tok, PROMPTS)  # tower 2 must have a projection (pooled output)
    with pytest.raises(UnsupportedModelError, match="t5"):
        sd3_conditioning(towers["clip_l"], te2, te1, tok, tok, tok, PROMPTS)
    with pytest.raises(InputError, match="tokenizer or input_ids"):
        flux_conditioning(towers["clip_l_plain"], t5, tok, None, PROMPTS)
    with pytest.raises(InputError, match="batch size"):
        flux_conditioning(towers["clip_l_plain"], t5, tok, None, PROMPTS, input_ids={"t5": t5_ids(3)})
    narrow = t5_tower(d_model=64)  # 32 + 48 CLIP features do not fit in a 64-wide T5 sequence
    with pytest.raises(InputError, match="exceed the T5 width"):
        sd3_conditioning(towers["clip_l"], te2, narrow, tok, tok, None, PROMPTS, input_ids={"t5": t5_ids()})

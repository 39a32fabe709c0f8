"""Binding probe: caption variants, image loading, CLIP/SigLIP scores against the transformers model's own logits,
text-only similarity, batch mode and the `fastenc probe` CLI handler. Tiny random-weight models, a tokenizer built
locally (no downloads)."""

import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, SiglipConfig, SiglipModel, T5Config, T5EncoderModel

import fastenc
from fastenc.core.errors import InputError, UnsupportedModelError
from fastenc.diagnostics.probe import (
    CLIP_MEAN,
    CLIP_STD,
    FLAG,
    add_probe_parser,
    binding_probe,
    caption_variants,
    load_pixel_values,
    probe_file,
    read_pairs,
    run_probe,
    text_similarity,
)
from tests.tokenizer_utils import build_clip_tokenizer
from tests.utils import assert_close

FP32 = dict(atol=3e-5, rtol=1e-4)
IMAGE = 24
PROMPT = "a red cube next to a blue sphere"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tok"))


def clip_model(vocab, layers=2):
    torch.manual_seed(0)
    text = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=layers, intermediate_size=64,
                max_position_embeddings=77, vocab_size=vocab, eos_token_id=vocab - 1, bos_token_id=vocab - 2,
                pad_token_id=vocab - 1)  # fmt: skip
    vision = dict(hidden_size=48, num_attention_heads=2, num_hidden_layers=layers, intermediate_size=96,
                  image_size=IMAGE, patch_size=8)  # fmt: skip
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()


def siglip_model(vocab):
    torch.manual_seed(0)
    text = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
                max_position_embeddings=16, vocab_size=vocab, projection_size=48, eos_token_id=vocab - 1,
                bos_token_id=vocab - 2, pad_token_id=vocab - 1)  # fmt: skip
    vision = dict(hidden_size=48, num_attention_heads=2, num_hidden_layers=2, intermediate_size=96,
                  image_size=IMAGE, patch_size=8)  # fmt: skip
    return SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()


@pytest.fixture(scope="module")
def clip(tok):
    return clip_model(len(tok))


def pixel_values(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, IMAGE, IMAGE, generator=g)


def reference_logits(model, tok, pv, captions):
    s = model.config.text_config.max_position_embeddings
    ids = tok(captions, padding="max_length", max_length=s, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pv).logits_per_image[0]


# -------------------------------------------------------------------------------------------- caption variants


def texts(variants, kind=None):
    return [v.text for v in variants if kind is None or v.kind == kind]


def test_variants_attribute_swap():
    v = caption_variants(PROMPT)
    assert texts(v, "attribute-swap") == ["a blue cube next to a red sphere"]
    assert "two red cubes next to a blue sphere" in texts(v, "count-change")
    assert texts(v, "role-swap") == []  # "next to" is symmetric: swapping the objects means the same thing
    assert v.reason is None


def test_variants_count_and_relation():
    v = caption_variants("two cats on a table")
    assert "one cat on a table" in texts(v, "count-change")
    assert texts(v, "relation-swap") == ["two cats under a table"]
    assert texts(v, "role-swap") == ["a table on two cats"]


def test_variants_role_swap_fixes_articles():
    v = caption_variants("a horse riding an astronaut")
    assert texts(v, "role-swap") == ["an astronaut riding a horse"]
    v = caption_variants("A cup to the left of a dog.")
    assert texts(v, "relation-swap") == ["a cup to the right of a dog"]


def test_variants_single_colour_and_unrecognised():
    assert texts(caption_variants("a red apple"), "attribute-change") == ["a blue apple"]
    v = caption_variants("an astronaut riding a horse on the moon at dawn")
    assert v == [] and "not recognised" in v.reason
    with pytest.raises(InputError, match="prompt is empty"):
        caption_variants("   ")


# ------------------------------------------------------------------------------------------------- binding probe


def test_clip_probe_matches_model_logits(clip, tok):
    pv = pixel_values()
    report = binding_probe(clip, tok, pv, PROMPT)
    captions = [c.caption for c in report.captions]
    assert captions[0] == PROMPT and len(captions) == 1 + len(caption_variants(PROMPT))
    ref = reference_logits(clip, tok, pv, captions)
    assert_close(torch.tensor([c.logit for c in report.captions]), ref, **FP32)
    assert_close(torch.tensor([c.prob for c in report.captions]), ref.softmax(-1), **FP32)
    assert math.isclose(sum(c.prob for c in report.captions), 1.0, rel_tol=1e-5)
    scale = clip.logit_scale.exp().item()
    for c in report.captions:
        assert math.isclose(c.logit, scale * c.cosine, rel_tol=1e-4, abs_tol=1e-5)
        assert c.sigmoid is None
    for c in report.captions[1:]:
        assert math.isclose(c.margin, report.captions[0].logit - c.logit, abs_tol=1e-5)
        assert c.flagged == (c.margin < report.threshold)


def test_threshold_flags(clip, tok):
    pv = pixel_values()
    everything = binding_probe(clip, tok, pv, PROMPT, ["a blue cube next to a red sphere"], threshold=1e9)
    nothing = binding_probe(clip, tok, pv, PROMPT, ["a blue cube next to a red sphere"], threshold=-1e9)
    assert [c.flagged for c in everything.captions] == [False, True]
    assert not nothing.flagged
    assert FLAG in everything.table() and "ok" in nothing.table()
    d = json.loads(everything.to_json())
    assert d["flagged"] == ["a blue cube next to a red sphere"] and d["captions"][1]["kind"] == "user"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_optimized_probe_matches_plain(tok, backend):
    model = clip_model(len(tok), layers=1)
    fast = fastenc.optimize(model, backend=backend, strict=True)
    pv = pixel_values(1)
    variants = ["a blue cube next to a red sphere"]
    a = binding_probe(model, tok, pv, PROMPT, variants)
    b = binding_probe(fast, tok, pv, PROMPT, variants)
    assert_close(torch.tensor([c.logit for c in b.captions]), torch.tensor([c.logit for c in a.captions]), **FP32)
    assert "fastenc" in b.model and "transformers" in a.model


def test_siglip_probe_has_sigmoid(tok):
    model = siglip_model(len(tok))
    pv = pixel_values(2)
    report = binding_probe(fastenc.optimize(model, backend="torch"), tok, pv, "two cats on a table")
    ref = reference_logits(model, tok, pv, [c.caption for c in report.captions])
    assert_close(torch.tensor([c.logit for c in report.captions]), ref, **FP32)
    assert_close(torch.tensor([c.sigmoid for c in report.captions]), torch.sigmoid(ref), **FP32)
    assert "sigmoid" in report.table()


def test_probe_bad_inputs(clip, tok, tmp_path):
    with pytest.raises(InputError, match="prompt"):
        binding_probe(clip, tok, pixel_values(), "")
    with pytest.raises(InputError, match="not recognised"):
        binding_probe(clip, tok, pixel_values(), "a cat sleeping on a sofa in the afternoon sun")
    with pytest.raises(InputError, match="does not exist"):
        binding_probe(clip, tok, tmp_path / "missing.png", PROMPT)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="image"):
        binding_probe(clip, tok, bad, PROMPT)
    with pytest.raises(InputError, match=r"\(1, 3, 24, 24\)"):
        binding_probe(clip, tok, torch.randn(1, 3, 32, 32), PROMPT)
    with pytest.raises(UnsupportedModelError, match="CLIPModel or SiglipModel"):
        binding_probe(CLIPTextModel(clip.config.text_config), tok, pixel_values(), PROMPT)


# ---------------------------------------------------------------------------------------------------- images


def test_raw_images_preprocessed_in_torch(clip, tmp_path):
    flat = np.full((40, 30, 3), 128, dtype=np.uint8)  # (H, W, 3), not square: short side resized, centre-cropped
    path = tmp_path / "img.npy"
    np.save(path, flat)
    pv, desc = load_pixel_values(str(path), clip)
    assert pv.shape == (1, 3, IMAGE, IMAGE) and "img.npy" in desc
    expect = (128 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert_close(pv[0, :, 5, 7], expect, atol=1e-5, rtol=1e-5)
    pt = tmp_path / "pv.pt"
    torch.save(pixel_values(3), pt)  # a float tensor file: already pixel_values
    pv2, _ = load_pixel_values(pt, clip)
    assert torch.equal(pv2, pixel_values(3))


def test_pil_image(clip, tok, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    img = Image.fromarray(np.full((30, 30, 3), 200, dtype=np.uint8))
    img.save(tmp_path / "x.png")
    a = binding_probe(clip, tok, img, PROMPT)
    b = binding_probe(clip, tok, tmp_path / "x.png", PROMPT)
    assert [c.logit for c in a.captions] == pytest.approx([c.logit for c in b.captions], abs=1e-5)


# -------------------------------------------------------------------------------------------------- text only


def test_text_similarity_matches_hand_computation(clip, tok):
    prompts = ["a horse riding an astronaut", "an astronaut riding a horse", "a red cube"]
    r = text_similarity(clip, tok, prompts)
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = clip.get_text_features(input_ids=ids)
    pooled = F.normalize(out.pooler_output, dim=-1)
    assert_close(torch.tensor(r.pooled), pooled @ pooled.T, **FP32)
    seq = F.normalize(out.last_hidden_state, dim=-1)
    n = max((ids[0] == tok.eos_token_id).nonzero()[0].item(), (ids[1] == tok.eos_token_id).nonzero()[0].item()) + 1
    tok01 = (seq[0, :n] * seq[1, :n]).sum(-1).mean()
    assert math.isclose(r.token_mean[0][1], tok01.item(), abs_tol=1e-5)
    assert math.isclose(r.pairs[0].token_all, (seq[0] * seq[1]).sum(-1).mean().item(), abs_tol=1e-5)
    assert all(math.isclose(r.pooled[i][i], 1.0, abs_tol=1e-5) for i in range(3))
    assert len(r.pairs) == 2 and "pooled" in r.table()
    json.loads(r.to_json())


def test_text_similarity_text_towers_and_errors(clip, tok):
    fast = fastenc.optimize(CLIPTextModel(clip.config.text_config).eval(), backend="torch")
    r = text_similarity(fast, tok, ["a red cube", "a blue cube"])
    assert -1.0 <= r.pairs[0].pooled <= 1.0 + 1e-6
    with pytest.raises(InputError, match="at least two"):
        text_similarity(clip, tok, ["a red cube"])
    with pytest.raises(InputError, match="empty"):
        text_similarity(clip, tok, ["a red cube", ""])
    t5 = T5EncoderModel(T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(UnsupportedModelError):
        text_similarity(t5, tok, ["a", "b"])


# ---------------------------------------------------------------------------------------------- batch mode


def test_probe_file(clip, tok, tmp_path):
    f = tmp_path / "pairs.txt"
    f.write_text("# comment\na horse riding an astronaut\tan astronaut riding a horse\n\na red cube | a blue cube\n")
    assert read_pairs(f) == [
        ("a horse riding an astronaut", "an astronaut riding a horse"),
        ("a red cube", "a blue cube"),
    ]
    text = probe_file(f, clip, tok, progress=False)
    assert len(text.reports) == 2 and len(text.reports[1].pairs) == 1
    img = probe_file(f, clip, tok, image=pixel_values(), progress=False)
    assert [r.captions[1].caption for r in img.reports] == ["an astronaut riding a horse", "a blue cube"]
    assert len(json.loads(img.to_json())["reports"]) == 2
    bad = tmp_path / "bad.txt"
    bad.write_text("only one prompt here\n")
    with pytest.raises(InputError, match="bad.txt:1"):
        read_pairs(bad)
    with pytest.raises(InputError, match="does not exist"):
        read_pairs(tmp_path / "nope.txt")


# ------------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, clip, tok):
    d = tmp_path_factory.mktemp("ckpt")
    clip.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def cli(*argv):
    p = argparse.ArgumentParser(prog="fastenc")
    add_probe_parser(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(["probe", *argv])
    return args.func(args)


def test_cli_image_json(model_dir, tmp_path, capsys):
    img = tmp_path / "img.npy"
    np.save(img, np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    rc = cli("--model", str(model_dir), "--image", str(img), "--prompt", PROMPT, "--json", "--backend", "torch")
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["prompt"] == PROMPT and len(d["captions"]) == 1 + len(caption_variants(PROMPT))
    assert "fastenc" in d["model"]


def test_cli_text_only_table_and_pairs(model_dir, tmp_path, capsys):
    rc = cli("--model", str(model_dir), "--text-only", "--prompt", "a horse riding an astronaut", "--no-optimize")
    assert rc == 0
    out = capsys.readouterr().out
    assert "an astronaut riding a horse" in out and "pooled" in out
    pairs = tmp_path / "p.txt"
    pairs.write_text("a red cube|a blue cube\n")
    rc = cli("--model", str(model_dir), "--text-only", "--pairs", str(pairs), "--json", "--no-progress")
    assert rc == 0 and len(json.loads(capsys.readouterr().out)["reports"]) == 1
    assert run_probe is not None


def test_cli_errors(model_dir, tmp_path, capsys):
    assert cli("--model", str(model_dir), "--image", str(tmp_path / "none.png"), "--prompt", PROMPT) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli("--model", str(model_dir), "--text-only", "--prompt", " ") == 2
    assert "empty" in capsys.readouterr().err
    assert cli("--model", str(tmp_path / "nodir"), "--text-only", "--prompt", PROMPT) == 2
    assert "not a directory" in capsys.readouterr().err
    assert cli("--model", str(model_dir), "--prompt", PROMPT) == 2  # no --image and not --text-only
    assert "--image is required" in capsys.readouterr().err

"""fastenc.diagnostics.tokens: token budget report, long-prompt chunking and the `fastenc tokens` command."""

import argparse
import json

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import fastenc
from fastenc.core.errors import InputError
from fastenc.diagnostics import chunk_prompt_ids, encode_long_prompt, load_tokenizer, token_report
from fastenc.diagnostics.tokens import add_tokens_parser, run_tokens
from tests.tokenizer_utils import build_clip_tokenizer
from tests.utils import assert_close

WORDS = "a red cat next to a blue dog on the table".split()  # each word is one token in the test vocabulary


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_clip_tokenizer(d)
    return d / "tokenizer"


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def text_model(tok, cls=CLIPTextModel, layers=2):
    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_attention_heads=2,
        num_hidden_layers=layers,
        intermediate_size=64,
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with (
        torch.no_grad()
    ):  # real CLIP embeddings have a nonzero mean; random init gives ~0, which mean-restore divides by
        getattr(model, "text_model", model).final_layer_norm.bias.copy_(torch.linspace(-0.5, 1.0, 32))
    return model


def words(n):
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def test_words_are_single_tokens(tok):
    for w in WORDS:
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w


@pytest.mark.parametrize("use_offsets", [True, False], ids=["offsets", "per-word"])
def test_report_fits(tok, use_offsets):
    r = token_report("a red cat", tok, use_offsets=use_offsets)
    assert (r.n_tokens, r.n_tokens_with_special, r.limit, r.budget) == (3, 5, 77, 75)
    assert not r.truncated and r.first_dropped_word is None and r.dropped_text == "" and r.dropped_words == []
    assert r.kept_text == "a red cat" and r.n_chunks == 1
    assert r.method == ("offsets" if use_offsets else "per-word")


@pytest.mark.parametrize("use_offsets", [True, False], ids=["offsets", "per-word"])
def test_report_exactly_at_budget_is_not_truncated(tok, use_offsets):
    r = token_report(words(75), tok, use_offsets=use_offsets)
    assert r.n_tokens == 75 and not r.truncated and r.n_chunks == 1


@pytest.mark.parametrize("use_offsets", [True, False], ids=["offsets", "per-word"])
def test_report_names_dropped_words(tok, use_offsets):
    prompt = words(80)
    r = token_report(prompt, tok, use_offsets=use_offsets)
    assert r.truncated and r.n_tokens == 80 and r.n_dropped_tokens == 5 and r.n_chunks == 2
    assert r.first_dropped_word == 75 and not r.cut_inside_word
    assert r.dropped_words == prompt.split()[75:]
    assert r.kept_text == " ".join(prompt.split()[:75])
    assert r.dropped_text == " ".join(prompt.split()[75:])


def test_report_cut_inside_a_word(tok):
    # "zebra" is not in the test vocabulary, so it is several tokens; put it across the budget boundary
    n_zebra = len(tok("zebra", add_special_tokens=False)["input_ids"])
    assert n_zebra > 1
    prompt = words(74) + " zebra cat"
    r = token_report(prompt, tok)
    assert r.truncated and r.first_dropped_word == 74 and r.cut_inside_word
    assert r.n_tokens == 74 + n_zebra + 1 and r.n_dropped_tokens == n_zebra
    assert r.dropped_words == ["zebra", "cat"]
    first = tok.convert_ids_to_tokens(tok("zebra", add_special_tokens=False)["input_ids"])[0]
    assert r.kept_text == words(74) + " " + first
    assert r.kept_text + r.dropped_text == prompt


def test_report_matches_transformers_truncation(tok):
    prompt = words(60) + ", highly detailed masterpiece, best quality, cinematic lighting, sharp focus"
    r = token_report(prompt, tok)
    kept_ids = tok(prompt, truncation=True, max_length=77)["input_ids"][1:-1]
    assert len(kept_ids) == min(r.n_tokens, r.budget)
    assert tok(r.kept_text, add_special_tokens=False)["input_ids"] == kept_ids


def test_report_max_length_and_dict(tok):
    r = token_report("a red cat next to a blue dog", tok, max_length=6)
    assert r.budget == 4 and r.truncated and r.first_dropped_word == 4 and r.dropped_text == "to a blue dog"
    d = r.to_dict()
    assert d["dropped_words"] == ["to", "a", "blue", "dog"] and json.loads(r.to_json())["budget"] == 4
    assert "dropped" in r.table() and "chunks" in r.table(chunk=True)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt(tok, prompt):
    with pytest.raises(InputError, match="prompt"):
        token_report(prompt, tok)


@pytest.mark.parametrize("prompt", [None, 3, ["a cat"], b"a cat"])
def test_non_str_prompt(tok, prompt):
    with pytest.raises(InputError, match="prompt must be a str"):
        token_report(prompt, tok)
    with pytest.raises(InputError, match="prompt must be a str"):
        chunk_prompt_ids(prompt, tok)


def test_bad_args(tok):
    with pytest.raises(InputError, match="max_length"):
        token_report("a cat", tok, max_length=2)
    with pytest.raises(InputError, match="chunk_size"):
        chunk_prompt_ids("a cat", tok, chunk_size=0)


def test_missing_tokenizer_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(InputError, match="nope.*does not exist"):
        load_tokenizer(missing)
    with pytest.raises(InputError, match="could not be loaded"):
        load_tokenizer(tmp_path)  # exists, but holds no tokenizer
    with pytest.raises(InputError, match="tokenizer path must be"):
        load_tokenizer(None)


@pytest.mark.parametrize("n_words,n_chunks", [(0, 1), (3, 1), (75, 1), (76, 2), (150, 2), (151, 3)])
def test_chunk_ids(tok, n_words, n_chunks):
    prompt = words(n_words)
    ids = chunk_prompt_ids(prompt, tok)
    assert ids.shape == (n_chunks, 77) and ids.dtype == torch.long
    flat = tok(prompt, add_special_tokens=False)["input_ids"]
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    for c in range(n_chunks):
        part = flat[c * 75 : (c + 1) * 75]
        row = ids[c].tolist()
        assert row[0] == bos and row[1 : 1 + len(part)] == part and row[1 + len(part)] == eos
        assert row[2 + len(part) :] == [pad] * (75 - len(part))


def test_chunk_fits_equals_padded_tokenizer(tok):
    prompt = "a red cat next to a blue dog"
    ref = tok(prompt, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    assert torch.equal(chunk_prompt_ids(prompt, tok), ref)


def test_chunk_custom_size(tok):
    ids = chunk_prompt_ids(words(10), tok, chunk_size=4)
    assert ids.shape == (3, 6)


@pytest.mark.parametrize("cls", [CLIPTextModel, CLIPTextModelWithProjection], ids=lambda c: c.__name__)
@pytest.mark.parametrize("hidden_layer", [-1, -2])
def test_encode_one_chunk_equals_plain_encode(tok, cls, hidden_layer):
    model = text_model(tok, cls)
    prompt = "a red cat next to a blue dog"
    ids = tok(prompt, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    ref = out.last_hidden_state if hidden_layer == -1 else out.hidden_states[hidden_layer]
    got, pooled = encode_long_prompt(model, tok, prompt, hidden_layer=hidden_layer, return_pooled=True)
    assert got.shape == (1, 77, 32)
    assert_close(got, ref, atol=1e-6, rtol=1e-5)
    ref_pooled = out.text_embeds if cls is CLIPTextModelWithProjection else out.pooler_output
    assert_close(pooled, ref_pooled, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n_words,n_chunks", [(100, 2), (200, 3)])
def test_encode_chunks_equal_each_chunk_alone(tok, n_words, n_chunks):
    model = text_model(tok)
    prompt = words(n_words)
    got = encode_long_prompt(model, tok, prompt)
    assert got.shape == (1, 77 * n_chunks, 32)
    ids = chunk_prompt_ids(prompt, tok)
    for c in range(n_chunks):
        with torch.no_grad():
            ref = model(input_ids=ids[c : c + 1]).last_hidden_state
        assert_close(got[:, 77 * c : 77 * (c + 1)], ref, atol=1e-5, rtol=1e-5)


def test_encode_penultimate_with_final_norm(tok):
    model = text_model(tok)
    prompt = words(90)
    got = encode_long_prompt(model, tok, prompt, hidden_layer=-2, final_layer_norm=True)
    ids = chunk_prompt_ids(prompt, tok)
    with torch.no_grad():
        norm = getattr(model, "text_model", model).final_layer_norm  # transformers 5 dropped the .text_model level
        ref = norm(model(input_ids=ids, output_hidden_states=True).hidden_states[-2])
    assert_close(got, ref.reshape(1, -1, 32), atol=1e-5, rtol=1e-5)


def test_encode_fastenc_optimized_matches_plain(tok):
    model = text_model(tok)
    fast = fastenc.optimize(text_model(tok), backend="torch")
    prompt = words(120)
    for layer in (-1, -2):
        assert_close(
            encode_long_prompt(fast, tok, prompt, hidden_layer=layer),
            encode_long_prompt(model, tok, prompt, hidden_layer=layer),
            atol=1e-4,
            rtol=1e-4,
        )


def test_encode_bad_args(tok):
    model = text_model(tok)
    with pytest.raises(InputError, match="hidden_layer"):
        encode_long_prompt(model, tok, "a cat", hidden_layer=10)
    with pytest.raises(InputError, match="hidden_layer"):
        encode_long_prompt(model, tok, "a cat", hidden_layer="last")
    with pytest.raises(InputError, match="chunk_size=80"):
        encode_long_prompt(model, tok, "a cat", chunk_size=80)


def cli(argv):
    p = argparse.ArgumentParser(prog="fastenc")
    add_tokens_parser(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_table(tok_dir, capsys):
    assert cli(["tokens", "--tokenizer", str(tok_dir), "a red cat"]) == 0
    out = capsys.readouterr().out
    assert "3 (+2 BOS/EOS = 5) of budget 75" in out and "truncated  no" in out


def test_cli_truncated_json(tok_dir, capsys):
    prompt = words(80)
    assert cli(["tokens", "--tokenizer", str(tok_dir), prompt, "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["truncated"] and d["first_dropped_word"] == 75 and d["dropped_words"] == prompt.split()[75:]
    assert "tokens" not in d
    assert cli(["tokens", "--tokenizer", str(tok_dir), prompt, "--json", "--chunk", "--tokens"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["n_chunks"] == 2 and d["chunk_shape"] == [2, 77] and len(d["tokens"]) == 80


def test_cli_chunk_table(tok_dir, capsys):
    assert (
        run_tokens(
            argparse.Namespace(
                tokenizer=str(tok_dir),
                prompt=words(160),
                max_length=None,
                chunk=True,
                chunk_size=75,
                tokens=False,
                json=False,
            )
        )
        == 0
    )
    assert "3 x (75 + 2) tokens -> sequence 231" in capsys.readouterr().out


def test_cli_errors(tok_dir, tmp_path, capsys):
    assert cli(["tokens", "--tokenizer", str(tmp_path / "missing"), "a cat"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["tokens", "--tokenizer", str(tok_dir), "  "]) == 2
    assert "empty" in capsys.readouterr().err

"""fastenc.diagnostics.weighting: the A1111 "(word:1.4)" parser and weighted prompt_embeds."""

import pytest
import torch

import fastenc
from fastenc.core.errors import InputError
from fastenc.diagnostics import (
    encode_long_prompt,
    load_tokenizer,
    parse_weighted_prompt,
    weighted_prompt_embeds,
    weighted_token_ids,
)
from tests.test_tokens import text_model, words
from tests.tokenizer_utils import build_clip_tokenizer
from tests.utils import assert_close

U, D = 1.1, 1 / 1.1


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_clip_tokenizer(d)
    return load_tokenizer(d / "tokenizer")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("a red cat", [("a red cat", 1.0)]),
        ("", []),
        ("a (red:1.5) cat", [("a ", 1.0), ("red", 1.5), (" cat", 1.0)]),
        ("(red:0.5)", [("red", 0.5)]),
        ("(red: 1.25 )", [("red", 1.25)]),
        ("(red:.5)", [("red", 0.5)]),
        ("(red:2)", [("red", 2.0)]),
        ("(red:-1)", [("red", -1.0)]),
        ("(red)", [("red", U)]),
        ("((red))", [("red", U * U)]),
        ("[red]", [("red", D)]),
        ("[[red]]", [("red", D * D)]),
        ("([red])", [("red", 1.0)]),
        ("(a (b:1.2))", [("a ", U), ("b", 1.2 * U)]),
        ("(a (b:1.2) c:2)", [("a ", 2.0), ("b", 2.4), (" c", 2.0)]),
        ("[a (b:1.5)]", [("a ", D), ("b", 1.5 * D)]),
        ("(a:1.2) (b:1.2)", [("a", 1.2), (" ", 1.0), ("b", 1.2)]),
        ("(a:1.2)(b:1.2)", [("ab", 1.2)]),
        (r"\(red\)", [("(red)", 1.0)]),
        (r"\[red\]", [("[red]", 1.0)]),
        (r"a \\ b", [("a \\ b", 1.0)]),
        (r"(a\:1.5)", [("a:1.5", U)]),
        (r"a \b", [(r"a \b", 1.0)]),
        ("photo: a cat", [("photo: a cat", 1.0)]),
        ("(photo: a cat)", [("photo: a cat", U)]),
        ("()", []),
        ("a () b", [("a  b", 1.0)]),
        ("(:1.5)", []),
    ],
)
def test_parse(text, expected):
    got = parse_weighted_prompt(text)
    assert [f for f, _ in got] == [f for f, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


@pytest.mark.parametrize(
    "text,match",
    [
        ("(red", r"unclosed '\(' at position 0"),
        ("a [red", r"unclosed '\[' at position 2"),
        ("a (b (c:1.2)", r"unclosed '\(' at position 2"),
        ("red)", r"unmatched '\)' at position 3"),
        ("red]", r"unmatched '\]' at position 3"),
        ("(red]", r"'\]' at position 4 closes '\(' opened at position 0"),
        ("[red)", r"'\)' at position 4 closes '\[' opened at position 0"),
        ("(red:1.2.3)", r"bad weight '1.2.3' at position 5"),
        ("(red:..)", r"bad weight"),
        ("(red:1.2", r"unclosed '\(' at position 0"),
    ],
)
def test_parse_errors(text, match):
    with pytest.raises(InputError, match=match):
        parse_weighted_prompt(text)


@pytest.mark.parametrize("text", [None, 1.5, ["a"]])
def test_parse_non_str(text):
    with pytest.raises(InputError, match="text must be a str"):
        parse_weighted_prompt(text)


def test_weighted_token_ids(tok):
    ids, w = weighted_token_ids("a (red:1.5) [cat]", tok)
    assert ids == tok("a red cat", add_special_tokens=False)["input_ids"]
    assert w == pytest.approx([1.0, 1.5, D])


@pytest.mark.parametrize("text", ["a red cat next to a blue dog", "(a red cat:1.0) next to a blue dog", words(170)])
@pytest.mark.parametrize("normalize_mean", [True, False])
def test_unit_weights_equal_unweighted(tok, text, normalize_mean):
    model = text_model(tok)
    plain = text.replace("(", "").replace(":1.0)", "")
    ref = encode_long_prompt(model, tok, plain)
    got = weighted_prompt_embeds(model, tok, text, normalize_mean=normalize_mean)
    assert got.shape == ref.shape
    assert_close(got, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("hidden_layer", [-1, -2])
def test_weighted_token_is_scaled(tok, hidden_layer):
    model = text_model(tok)
    ref = encode_long_prompt(model, tok, "a red cat next to a blue dog", hidden_layer=hidden_layer)
    got = weighted_prompt_embeds(
        model, tok, "a (red:1.5) cat next to a [blue] dog", hidden_layer=hidden_layer, normalize_mean=False
    )
    scale = torch.ones(77)
    scale[2], scale[7] = 1.5, D  # positions: BOS a red cat next to a blue dog
    assert_close(got, ref * scale[None, :, None], atol=1e-6, rtol=1e-5)


def test_mean_is_restored(tok):
    model = text_model(tok)
    ref = encode_long_prompt(model, tok, words(20) + " " + words(80))
    text = "(" + words(20) + ":1.8) " + words(80)
    raw = weighted_prompt_embeds(model, tok, text, normalize_mean=False)
    got = weighted_prompt_embeds(model, tok, text, normalize_mean=True)
    assert got.shape == (1, 154, 32)
    for c in range(2):
        sl = slice(77 * c, 77 * (c + 1))
        assert got[:, sl].mean().item() == pytest.approx(ref[:, sl].mean().item(), rel=1e-4, abs=1e-6)
        ratio = ref[:, sl].mean() / raw[:, sl].mean()
        assert_close(got[:, sl], raw[:, sl] * ratio, atol=1e-6, rtol=1e-5)
    # the weighted tokens of chunk 0 differ from unweighted; chunk 1 has weight 1 everywhere so is unchanged
    assert not torch.allclose(got[:, 1:21], ref[:, 1:21])
    assert_close(got[:, 77:], ref[:, 77:], atol=1e-6, rtol=1e-5)


def test_pooled_and_optimized(tok):
    model = text_model(tok)
    fast = fastenc.optimize(text_model(tok), backend="torch")
    text = "a (red:1.4) cat, " + words(90)
    e1, p1 = weighted_prompt_embeds(model, tok, text, return_pooled=True)
    e2, p2 = weighted_prompt_embeds(fast, tok, text, return_pooled=True)
    assert e1.shape == (1, 154, 32) and p1.shape == (1, 32)
    assert_close(e2, e1, atol=1e-4, rtol=1e-4)
    assert_close(p2, p1, atol=1e-4, rtol=1e-4)


def test_embeds_errors(tok):
    model = text_model(tok)
    with pytest.raises(InputError, match="unclosed"):
        weighted_prompt_embeds(model, tok, "(red")
    with pytest.raises(InputError, match="chunk_size"):
        weighted_prompt_embeds(model, tok, "red", chunk_size=0)

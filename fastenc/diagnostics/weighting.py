"""Prompt weighting in the A1111 syntax, applied to per-token embeddings before cross-attention.

Syntax (stable-diffusion-webui's `parse_prompt_attention`):
    (text)        weight x 1.1          [text]        weight / 1.1
    (text:1.4)    weight x 1.4          nesting multiplies: "(a (b:1.2))" -> a: 1.1, b: 1.32
    \\( \\) \\[ \\] \\\\ \\:  literal characters
Unlike the webui, unbalanced brackets are an error (InputError with the position), not silently closed.

`weighted_prompt_embeds` tokenises each fragment, keeps one weight per token, chunks as `encode_long_prompt`
does, encodes, multiplies each token's vector by its weight and (normalize_mean=True) rescales each chunk so its
mean equals the unweighted mean -> (1, 77 * n_chunks, D), usable as a diffusers pipeline's `prompt_embeds`.
"""

from __future__ import annotations

import re

from ..core.errors import InputError
from .tokens import DEFAULT_CHUNK, _check_chunk_size, _check_positions, _check_prompt, _chunk, encode_chunks

ROUND_UP = 1.1
ESCAPABLE = "()[]\\:"
_WEIGHT = re.compile(r":\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)")


def parse_weighted_prompt(text) -> list[tuple[str, float]]:
    """Split `text` into (fragment, weight) pairs; adjacent fragments of equal weight are merged.

    >>> parse_weighted_prompt("a (red:1.5) cat")
    [('a ', 1.0), ('red', 1.5), (' cat', 1.0)]
    """
    _check_prompt(text, name="text", allow_empty=True)
    out: list[list] = []  # [fragment, weight]
    stack: list[tuple[str, int, int]] = []  # (bracket, position in text, index into out where the group starts)
    buf: list[str] = []

    def flush():
        if buf:
            out.append(["".join(buf), 1.0])
            buf.clear()

    def scale(start, factor):
        for frag in out[start:]:
            frag[1] *= factor

    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n and text[i + 1] in ESCAPABLE:
            buf.append(text[i + 1])
            i += 2
            continue
        if ch in "([":
            flush()
            stack.append((ch, i, len(out)))
        elif ch == ":" and stack and stack[-1][0] == "(":
            m = _WEIGHT.match(text, i)
            if m is None:
                close = text.find(")", i)
                if close != -1 and re.fullmatch(r":\s*[+\-.\d]+\s*", text[i:close]):
                    raise InputError(f"text: bad weight {text[i + 1 : close].strip()!r} at position {i + 1}")
                buf.append(ch)  # a literal ':' inside parentheses, e.g. "(photo: a cat)"
            else:
                flush()
                _, _, start = stack.pop()
                scale(start, float(m.group(1)))
                i = m.end()
                continue
        elif ch in ")]":
            opener = "(" if ch == ")" else "["
            if not stack:
                raise InputError(f"text: unmatched {ch!r} at position {i} (escape it as '\\{ch}' for a literal)")
            if stack[-1][0] != opener:
                raise InputError(
                    f"text: {ch!r} at position {i} closes {stack[-1][0]!r} opened at position {stack[-1][1]}"
                )
            flush()
            _, _, start = stack.pop()
            scale(start, ROUND_UP if ch == ")" else 1 / ROUND_UP)
        else:
            buf.append(ch)
        i += 1
    if stack:
        br, pos, _ = stack[-1]
        raise InputError(f"text: unclosed {br!r} at position {pos}")
    flush()
    merged: list[tuple[str, float]] = []
    for frag, w in out:
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + frag, w)
        else:
            merged.append((frag, w))
    return merged


def weighted_token_ids(text, tokenizer) -> tuple[list[int], list[float]]:
    """Token ids of `text` (no BOS/EOS) with one weight per token. Fragments are tokenised separately."""
    ids: list[int] = []
    weights: list[float] = []
    for frag, w in parse_weighted_prompt(text):
        frag_ids = tokenizer(frag, add_special_tokens=False)["input_ids"]
        ids += list(frag_ids)
        weights += [float(w)] * len(frag_ids)
    return ids, weights


def apply_weights(hidden, weights, normalize_mean=True):
    """hidden (n, L, D) * weights (n, L) per token; normalize_mean rescales each chunk to its original mean."""
    import torch

    w = weights.to(device=hidden.device, dtype=hidden.dtype)[..., None]  # (n, L, 1)
    out = hidden * w
    if normalize_mean:
        before = hidden.float().mean(dim=(1, 2), keepdim=True)
        after = out.float().mean(dim=(1, 2), keepdim=True)
        # a chunk whose weighted mean is ~0 cannot be rescaled; it is left as weighted
        ratio = torch.where(after.abs() > 1e-12, before / after.where(after != 0, 1.0), 1.0)
        out = (out.float() * ratio).to(hidden.dtype)
    return out


def weighted_prompt_embeds(
    text_model,
    tokenizer,
    text,
    chunk_size=DEFAULT_CHUNK,
    hidden_layer=-1,
    final_layer_norm=False,
    normalize_mean=True,
    return_pooled=False,
):
    """prompt_embeds (1, (chunk_size + 2) * n_chunks, D) for `text` in the "(word:1.4)" syntax.

    Same chunking and hidden_layer options as `encode_long_prompt`; with return_pooled=True also returns the first
    chunk's pooled vector (unweighted, as A1111 and compel do)."""
    _check_chunk_size(chunk_size)
    _check_positions(text_model, chunk_size)
    ids, weights = weighted_token_ids(text, tokenizer)
    input_ids, w = _chunk(ids, tokenizer, chunk_size, weights)
    hidden, pooled = encode_chunks(text_model, input_ids, hidden_layer, final_layer_norm)
    embeds = apply_weights(hidden, w, normalize_mean).reshape(1, -1, hidden.shape[-1])
    if return_pooled:
        if pooled is None:
            raise InputError("text_model output has neither text_embeds nor pooler_output")
        return embeds, pooled[:1]
    return embeds

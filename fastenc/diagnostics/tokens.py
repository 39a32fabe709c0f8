"""Token budget report and long-prompt chunking for CLIP-style tokenizers.

A CLIP text tower sees at most `model_max_length` tokens (77), two of which are BOS and EOS, so a prompt has a
budget of 75 tokens; everything after is silently dropped by `tokenizer(..., truncation=True)`. `token_report`
says how many tokens a prompt takes and exactly which words fall past the budget. `chunk_prompt_ids` /
`encode_long_prompt` do what the common SD front-ends (A1111, compel, ComfyUI) do instead: split the tokens into
75-token chunks, wrap each as BOS + chunk + EOS + padding, encode each chunk and concatenate the per-token hidden
states along the sequence axis -> (1, 77 * n_chunks, D).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from ..core.errors import InputError

DEFAULT_CHUNK = 75


def load_tokenizer(path):
    """Load a tokenizer from a local directory (save_pretrained layout). Nothing is downloaded."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"tokenizer path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"tokenizer path {path!r} does not exist (a local save_pretrained directory is expected)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError depending on what is missing
        raise InputError(f"tokenizer path {path!r} could not be loaded as a tokenizer: {exc}") from exc


def check_prompts(prompts, arg: str = "prompts") -> list[str]:
    """A str or a non-empty sequence of non-empty str -> list[str]; InputError naming `arg` otherwise."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not prompts:
        raise InputError(f"{arg} must be a str or a non-empty list of str, got {prompts!r}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InputError(f"{arg}[{i}] must be a str, got {type(p).__name__}")
        if not p.strip():
            raise InputError(f"{arg}[{i}] is an empty prompt")
    return list(prompts)


def _check_prompt(prompt, name="prompt", allow_empty=False) -> str:
    if not isinstance(prompt, str):
        raise InputError(f"{name} must be a str, got {type(prompt).__name__}")
    if not allow_empty and not prompt.strip():
        raise InputError(f"{name} is empty or whitespace only ({prompt!r})")
    return prompt


def _check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def _specials(tokenizer) -> tuple[int, int, int]:
    """(bos, eos, pad) ids; pad falls back to eos as in the OpenAI CLIP tokenizer."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise InputError(f"tokenizer {type(tokenizer).__name__} has no bos/eos token; a CLIP-style tokenizer is needed")
    pad = tokenizer.pad_token_id
    return bos, eos, eos if pad is None else pad


def _limit(tokenizer, max_length) -> int:
    if max_length is None:
        max_length = tokenizer.model_max_length
        if max_length is None or max_length > 1_000_000:  # transformers' "no limit" sentinel is ~1e30
            raise InputError("tokenizer has no model_max_length; pass max_length (77 for CLIP)")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 3:
        raise InputError(f"max_length must be an int >= 3 (BOS + 1 token + EOS), got {max_length!r}")
    return int(max_length)


@dataclass
class TokenReport:
    """How a prompt fits a tokenizer's window. Counts without BOS/EOS unless the name says otherwise."""

    prompt: str
    limit: int  # the tokenizer's window, BOS and EOS included (77 for CLIP)
    budget: int  # limit - 2: tokens left for the prompt
    n_tokens: int
    n_tokens_with_special: int
    truncated: bool
    n_dropped_tokens: int
    first_dropped_word: int | None  # index into prompt.split(); None if nothing is cut
    cut_inside_word: bool  # the budget ends in the middle of that word (its first tokens are kept)
    kept_text: str
    dropped_text: str
    dropped_words: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    chunk_size: int = DEFAULT_CHUNK
    n_chunks: int = 1  # chunks needed by long-prompt chunking (chunk_prompt_ids)
    method: str = "offsets"  # "offsets" (fast tokenizer) or "per-word" (tokenizing word by word)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self, chunk: bool = False) -> str:
        rows = [
            (
                "tokens",
                f"{self.n_tokens} (+2 BOS/EOS = {self.n_tokens_with_special}) of budget {self.budget}"
                f" (limit {self.limit})",
            ),
            ("truncated", "yes" if self.truncated else "no"),
        ]
        if self.truncated:
            word = f"word {self.first_dropped_word}" + (" (cut inside the word)" if self.cut_inside_word else "")
            rows += [
                ("dropped tokens", str(self.n_dropped_tokens)),
                ("first dropped", word),
                ("kept", self.kept_text),
                ("dropped", self.dropped_text),
            ]
        if chunk:
            rows.append(
                (
                    "chunks",
                    f"{self.n_chunks} x ({self.chunk_size} + 2) tokens"
                    f" -> sequence {self.n_chunks * (self.chunk_size + 2)}",
                )
            )
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _word_spans(prompt: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\S+", prompt)]


def _token_starts_offsets(prompt, tokenizer) -> tuple[list[int], list[int]] | None:
    """(ids, char start of each token) from a fast tokenizer's offset mapping, or None if unavailable."""
    try:
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return None
    offsets = enc.get("offset_mapping")
    if offsets is None:
        return None
    return list(enc["input_ids"]), [int(s) for s, _ in offsets]


def _token_starts_per_word(prompt, tokenizer) -> tuple[list[int], list[int]]:
    """Fallback for slow tokenizers: tokenize word by word (CLIP's pre-tokenizer never merges across whitespace),
    so each token is assigned the start of its word."""
    ids, starts = [], []
    for s, e in _word_spans(prompt):
        word_ids = tokenizer(prompt[s:e], add_special_tokens=False)["input_ids"]
        ids += list(word_ids)
        starts += [s] * len(word_ids)
    return ids, starts


def token_report(prompt, tokenizer, max_length=None, chunk_size=DEFAULT_CHUNK, use_offsets=True) -> TokenReport:
    """Token count of `prompt` against the tokenizer's window and exactly which words are cut off."""
    _check_prompt(prompt)
    _check_chunk_size(chunk_size)
    limit = _limit(tokenizer, max_length)
    budget = limit - 2
    got = _token_starts_offsets(prompt, tokenizer) if use_offsets else None
    method = "offsets"
    if got is None:
        got, method = _token_starts_per_word(prompt, tokenizer), "per-word"
    ids, starts = got
    n = len(ids)
    spans = _word_spans(prompt)
    truncated = n > budget
    first_word, inside, kept, dropped, dropped_words = None, False, prompt.strip(), "", []
    if truncated:
        cut = starts[budget]
        first_word = next(i for i, (s, e) in enumerate(spans) if e > cut)
        inside = cut > spans[first_word][0]
        kept, dropped = prompt[:cut].rstrip(), prompt[cut:].strip()
        dropped_words = [prompt[s:e] for s, e in spans[first_word:]]
    return TokenReport(
        prompt=prompt,
        limit=limit,
        budget=budget,
        n_tokens=n,
        n_tokens_with_special=n + 2,
        truncated=truncated,
        n_dropped_tokens=max(0, n - budget),
        first_dropped_word=first_word,
        cut_inside_word=inside,
        kept_text=kept,
        dropped_text=dropped,
        dropped_words=dropped_words,
        tokens=tokenizer.convert_ids_to_tokens(ids),
        chunk_size=chunk_size,
        n_chunks=max(1, math.ceil(n / chunk_size)),
        method=method,
    )


def _chunk(ids, tokenizer, chunk_size, weights=None):
    """Split token ids (and optional per-token weights) into rows of BOS + <= chunk_size ids + EOS + pad.

    Returns (input_ids LongTensor (n_chunks, chunk_size + 2), weights FloatTensor of the same shape; 1.0 on
    BOS/EOS/pad). An empty id list gives one chunk (BOS, EOS, pad...), as front-ends encode an empty prompt."""
    import torch

    bos, eos, pad = _specials(tokenizer)
    width = chunk_size + 2
    n = max(1, math.ceil(len(ids) / chunk_size))
    out = torch.full((n, width), pad, dtype=torch.long)
    w = torch.ones((n, width), dtype=torch.float32)
    for c in range(n):
        part = ids[c * chunk_size : (c + 1) * chunk_size]
        out[c, 0] = bos
        out[c, 1 : 1 + len(part)] = torch.tensor(part, dtype=torch.long)
        out[c, 1 + len(part)] = eos
        if weights is not None:
            w[c, 1 : 1 + len(part)] = torch.tensor(weights[c * chunk_size : (c + 1) * chunk_size])
    return out, w


def chunk_prompt_ids(prompt, tokenizer, chunk_size=DEFAULT_CHUNK):
    """(n_chunks, chunk_size + 2) input_ids: each row BOS + up to chunk_size tokens + EOS, padded with the pad id
    (eos when the tokenizer has none). An empty prompt gives one chunk, as negative prompts are often empty."""
    _check_prompt(prompt, allow_empty=True)
    _check_chunk_size(chunk_size)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return _chunk(list(ids), tokenizer, chunk_size)[0]


def _model_param(text_model):
    try:
        return next(text_model.parameters())
    except StopIteration as exc:
        raise InputError("text_model has no parameters") from exc


def _final_norm(text_model):
    inner = getattr(text_model, "text_model", text_model)
    norm = getattr(inner, "final_layer_norm", None)
    if norm is None:
        raise InputError(f"final_layer_norm=True needs a CLIP text model; {type(text_model).__name__} has none")
    return norm


def encode_chunks(text_model, input_ids, hidden_layer=-1, final_layer_norm=False):
    """Run a CLIP text tower over (n_chunks, L) ids -> (hidden (n_chunks, L, D), pooled (n_chunks, P) or None).

    hidden_layer=-1 is last_hidden_state; any other index reads output_hidden_states (so -2 is the penultimate
    layer's output, as SDXL and "clip skip 2" use) and, with final_layer_norm=True, applies the tower's final
    LayerNorm to it (A1111's clip-skip rule for SD1.x)."""
    import torch

    if isinstance(hidden_layer, bool) or not isinstance(hidden_layer, int):
        raise InputError(f"hidden_layer must be an int (-1 last, -2 penultimate, ...), got {hidden_layer!r}")
    param = _model_param(text_model)
    input_ids = input_ids.to(param.device)
    with torch.no_grad():
        if hidden_layer == -1:
            out = text_model(input_ids=input_ids)
            hidden = out.last_hidden_state
        else:
            out = text_model(input_ids=input_ids, output_hidden_states=True)
            states = out.hidden_states
            if not -len(states) <= hidden_layer < len(states):
                raise InputError(f"hidden_layer={hidden_layer} out of range for {len(states)} hidden states")
            hidden = states[hidden_layer]
            if final_layer_norm:
                hidden = _final_norm(text_model)(hidden)
    pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        pooled = getattr(out, "pooler_output", None)
    return hidden, pooled


def _check_positions(text_model, chunk_size):
    cfg = getattr(text_model, "config", None)
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos is not None and chunk_size + 2 > max_pos:
        raise InputError(f"chunk_size={chunk_size} needs {chunk_size + 2} positions; the model has {max_pos}")


def encode_long_prompt(
    text_model,
    tokenizer,
    prompt,
    chunk_size=DEFAULT_CHUNK,
    hidden_layer=-1,
    final_layer_norm=False,
    return_pooled=False,
):
    """Encode a prompt of any length as concatenated 77-token chunks -> (1, (chunk_size + 2) * n_chunks, D).

    `text_model` is a CLIPTextModel / CLIPTextModelWithProjection, fastenc-optimized or not. With return_pooled=True
    returns (embeds, pooled) where pooled is the first chunk's pooled/projected vector (1, P), the convention of
    A1111 and compel for SDXL's pooled_prompt_embeds."""
    _check_chunk_size(chunk_size)
    _check_positions(text_model, chunk_size)
    ids = chunk_prompt_ids(prompt, tokenizer, chunk_size)
    hidden, pooled = encode_chunks(text_model, ids, hidden_layer, final_layer_norm)
    embeds = hidden.reshape(1, -1, hidden.shape[-1])  # (n, L, D) -> (1, n * L, D)
    if return_pooled:
        if pooled is None:
            raise InputError("text_model output has neither text_embeds nor pooler_output")
        return embeds, pooled[:1]
    return embeds


def add_tokens_parser(subparsers):
    """Add `fastenc tokens` to an argparse subparsers object; returns the subparser."""
    p = subparsers.add_parser("tokens", help="token count of a prompt against the 77-token limit; what is cut off")
    p.add_argument("prompt", help="the prompt (quote it)")
    p.add_argument("--tokenizer", required=True, help="local tokenizer directory (save_pretrained); never downloaded")
    p.add_argument("--max-length", type=int, default=None, help="window incl. BOS/EOS (default: the tokenizer's)")
    p.add_argument("--chunk", action="store_true", help="also report long-prompt chunking (75-token chunks)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help="tokens per chunk (default %(default)s)")
    p.add_argument("--tokens", action="store_true", help="list the tokens too")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_tokens)
    return p


def run_tokens(args) -> int:
    """`fastenc tokens`: 0 if the prompt fits (or --chunk is given), 1 if it would be truncated, 2 on bad input."""
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        report = token_report(args.prompt, tokenizer, max_length=args.max_length, chunk_size=args.chunk_size)
        ids = chunk_prompt_ids(args.prompt, tokenizer, args.chunk_size) if args.chunk else None
    except InputError as exc:
        from .._cli_common import fail

        return fail("tokens", exc)
    if args.json:
        d = report.to_dict()
        if not args.tokens:
            d.pop("tokens")
        if ids is not None:
            d["chunk_shape"] = list(ids.shape)
        print(json.dumps(d, indent=2))
    else:
        print(report.table(chunk=args.chunk))
        if args.tokens:
            print("tokens: " + " ".join(report.tokens))
    return 0 if (args.chunk or not report.truncated) else 1

"""A real CLIP tokenizer built locally (no downloads): byte-level BPE over a small lowercase word list.

`build_clip_tokenizer(tmp_path)` writes vocab.json + merges.txt, builds `transformers.CLIPTokenizer`, saves it with
`save_pretrained(tmp_path / "tokenizer")` and returns the tokenizer reloaded from that path (so tests can also pass
the path to `fastenc tokens --tokenizer`). Ids: 256 byte symbols, 256 byte symbols + "</w>", one id per merge,
then "<|startoftext|>" and "<|endoftext|>" (bos/eos/pad/unk), as in the OpenAI vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

WORDS = (
    "a an the of and or with on in at to next by under over above below behind riding holding wearing "
    "red blue green yellow black white orange purple pink brown gray golden silver "
    "cat dog horse astronaut man woman child bird car tree house cube sphere ball cup table chair "
    "one two three four five many small large big tiny tall short old young happy sad "
    "photo painting drawing portrait landscape city forest mountain river sea sky sunset night day "
    "beautiful detailed highly masterpiece quality best lighting cinematic sharp focus style art "
    "standing sitting running flying sleeping eating looking left right front top bottom"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _bpe(syms: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE: merge the lowest-ranked adjacent pair until none is in `ranks`."""
    while len(syms) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(syms[:-1], syms[1:], strict=True))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        syms = syms[:i] + [syms[i] + syms[i + 1]] + syms[i + 2 :]
    return syms


def vocab_and_merges(words=WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for w in words:  # each word becomes one token: chain-merge what the merges so far leave of it
        syms = _bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks)
        cur = syms[0]
        for s in syms[1:]:
            pair, cur = (cur, s), cur + s
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            vocab.setdefault(cur, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def build_clip_tokenizer(tmp_path, model_max_length: int = 77):
    """Return a CLIPTokenizer loaded from `tmp_path / "tokenizer"` (also usable as a path: `tokenizer.name_or_path`)."""
    from transformers import AutoTokenizer, CLIPTokenizer

    tmp_path = Path(tmp_path)
    vocab, merges = vocab_and_merges()
    src = tmp_path / "tokenizer_src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(
        vocab=str(src / "vocab.json"),
        merges=str(src / "merges.txt"),
        model_max_length=model_max_length,
    )
    out = tmp_path / "tokenizer"
    tok.save_pretrained(str(out))
    return AutoTokenizer.from_pretrained(str(out), local_files_only=True)


def tokenizer_path(tmp_path) -> str:
    build_clip_tokenizer(tmp_path)
    return str(Path(tmp_path) / "tokenizer")

"""Dataset-scale embedding and search: `fastenc embed` / `fastenc search` (see README, "Embedding a dataset and
searching it").

    from fastenc.embed import EmbedConfig, embed
    from fastenc.embed.search import search                    # the function (fastenc.embed.search is its module)
    embed(EmbedConfig(model="ckpt/", input="shards/", out="emb/", tower="both"))
    hits = search("emb/", text=["a red cat"], k=10)

reader.py: input sources and the per-sample work of loader workers; shards.py: the output layout (atomic shards,
resume, manifest); pipeline.py: the single-machine run; ray_backend.py: the same pipeline on Ray Data; search.py:
exact streamed top-k (and FAISS); cli.py: the two subcommands (their parsers import no torch). The names below load
on first use.
"""

import importlib as _importlib

_LAZY = {"EmbedConfig": ".pipeline", "EmbedReport": ".pipeline", "embed": ".pipeline"}  # public name -> its module


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(_importlib.import_module(_LAZY[name], __name__), name)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["EmbedConfig", "EmbedReport", "embed"]

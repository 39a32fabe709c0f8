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

from ..core.lazy import lazy_names

_LAZY = {"EmbedConfig": ".pipeline", "EmbedReport": ".pipeline", "embed": ".pipeline"}  # public name -> its module


__getattr__, __dir__ = lazy_names(__name__, _LAZY)


__all__ = ["EmbedConfig", "EmbedReport", "embed"]

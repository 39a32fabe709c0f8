"""`fastenc search`: exact top-k cosine over an embedding folder written by `fastenc embed`, streamed shard by shard.

Per shard, `fastenc.ops.topk_cosine(queries, shard, min(k, rows))` (itself chunked over the shard's rows), then a
merge with the running top-k: the running list (lower global rows) goes first into a stable sort, so the result -
ties included - equals topk_cosine over all shards concatenated. Memory: one shard's rows plus O(Q * k), never the
(Q, N) similarity matrix. Global row r is the r-th successful sample in index order (shard by shard).

FAISS (optional, `pip install 'fastenc[faiss]'`): `build_faiss_index` trains an index_factory index (inner product
over L2-normalised rows, e.g. "IVF-PQ" = IVF{~4 sqrt N},PQ{dim/4}, 4-bit codes below ~10k rows) from the shards and
saves it in the folder; `search(..., faiss=spec)` uses it (approximate for IVF / PQ specs; "Flat" is exact).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .shards import MANIFEST, atomic_write, load_embeddings


@dataclass
class Hit:
    query: int
    rank: int
    score: float
    id: str
    path: str
    caption: str | None
    shard: int
    row: int
    index: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class EmbeddingIndex:
    """An output folder of `fastenc embed`: its manifest, shard files and metadata."""

    def __init__(self, folder: str):
        path = os.path.join(folder, MANIFEST)
        if not os.path.isfile(path):
            raise InputError(f"--index {folder!r} has no {MANIFEST}: not a finished `fastenc embed` output folder")
        with open(path) as f:
            self.manifest = json.load(f)
        self.folder = folder
        self.towers = self.manifest["towers"]
        self.shards = self.manifest["shards"]
        self.rows = [s["rows"] for s in self.shards]
        self.offsets = np.cumsum([0, *self.rows])
        self._meta: dict[int, dict] = {}

    def check_tower(self, tower: str | None) -> str:
        if tower is None:
            return "image" if "image" in self.towers else self.towers[0]
        if tower not in self.towers:
            raise InputError(f"--tower {tower!r}: the index holds {', '.join(self.towers)} embeddings only")
        return tower

    def shard_embeddings(self, tower: str, i: int) -> np.ndarray:
        return load_embeddings(os.path.join(self.folder, self.shards[i]["files"][tower]))

    def meta(self, i: int) -> dict:
        """Shard i's metadata as columns, with the successful rows' positions (row -> metadata position)."""
        if i not in self._meta:
            import pyarrow.parquet as pq

            m = pq.read_table(os.path.join(self.folder, self.shards[i]["files"]["meta"])).to_pydict()
            m["by_row"] = {r: j for j, r in enumerate(m["row"]) if r >= 0}
            self._meta[i] = m
        return self._meta[i]

    def locate(self, global_row: int) -> tuple[int, int]:
        s = int(np.searchsorted(self.offsets, global_row, side="right")) - 1
        return s, int(global_row - self.offsets[s])

    def lookup_ids(self, ids: list[str], tower: str) -> np.ndarray:
        """The stored embeddings of samples by id (InputError for an id not in the index or one that failed)."""
        want = {x: None for x in ids}
        for i in range(len(self.shards)):
            m = self.meta(i)
            hits = [(j, x) for j, x in enumerate(m["id"]) if x in want and want[x] is None]
            if hits:
                emb = self.shard_embeddings(tower, i)
                for j, x in hits:
                    r = m["row"][j]
                    if r < 0:
                        raise InputError(f"--ids: sample {x!r} failed during embedding ({m['error'][j]})")
                    want[x] = np.array(emb[r], dtype=np.float32)
        missing = [x for x, v in want.items() if v is None]
        if missing:
            raise InputError(f"--ids: {len(missing)} id(s) not in the index, e.g. {missing[:3]}")
        return np.stack([want[x] for x in ids])

    def hit(self, q: int, rank: int, score: float, global_row: int) -> Hit:
        s, r = self.locate(global_row)
        m = self.meta(s)
        j = m["by_row"][r]
        return Hit(q, rank, score, m["id"][j], m["path"][j], m["caption"][j], self.shards[s]["shard"], r, m["index"][j])


def exact_topk(index: EmbeddingIndex, queries, k: int, tower: str, *, backend: str | None = None):
    """(scores (Q, k'), global rows (Q, k')) with k' = min(k, rows in the index), streamed over the shards."""
    import torch

    from ..ops import topk_cosine

    q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
    best_v = best_i = None
    for i in range(len(index.shards)):
        n = index.rows[i]
        if n == 0:
            continue
        g = torch.from_numpy(np.array(index.shard_embeddings(tower, i), dtype=np.float32))  # one shard in memory
        v, idx = topk_cosine(q, g, min(k, n), backend=backend)
        idx = idx + int(index.offsets[i])
        if best_v is not None:  # running top-k first: a stable sort keeps ties in ascending global row
            v, idx = torch.cat([best_v, v], 1), torch.cat([best_i, idx], 1)
            v, order = torch.sort(v, dim=1, descending=True, stable=True)
            v, idx = v[:, :k], torch.gather(idx, 1, order[:, :k])
        best_v, best_i = v, idx
    if best_v is None:
        raise InputError(f"--index {index.folder!r} holds no {tower} embeddings (every sample failed)")
    return best_v.numpy(), best_i.numpy()


def faiss_spec(spec: str, n: int, dim: int) -> str:
    """'IVF-PQ' -> an index_factory string sized for n rows of width dim; anything else is passed through."""
    if spec.upper() not in ("IVF-PQ", "IVFPQ"):
        return spec
    nlist = max(1, min(65536, int(4 * math.sqrt(n)), n // 39))
    m = next(m for m in (dim // 4, dim // 8, 16, 8, 4, 2, 1) if m >= 1 and dim % m == 0)
    bits = "" if n >= 39 * 256 else "x4"  # 8-bit codebooks want >= 39 x 256 training rows (faiss's own rule)
    return f"IVF{nlist},PQ{m}{bits}"


def _faiss():
    try:
        import faiss
    except ImportError:
        raise InputError("--faiss needs the faiss package: pip install 'fastenc[faiss]'") from None
    return faiss


def build_faiss_index(index: EmbeddingIndex, tower: str, spec: str) -> str:
    """Train and fill a FAISS index over every row (inner product of L2-normalised rows); saved atomically as
    faiss-<tower>-<spec>.index in the folder (reused when present). Returns its path."""
    faiss = _faiss()
    n = int(index.offsets[-1])
    dim = index.manifest["dims"][tower]
    factory = faiss_spec(spec, n, dim)
    path = os.path.join(index.folder, f"faiss-{tower}-{factory.replace(',', '_')}.index")
    if os.path.isfile(path):
        return path
    x = np.concatenate([np.asarray(index.shard_embeddings(tower, i), dtype=np.float32)
                        for i in range(len(index.shards)) if index.rows[i]])  # fmt: skip
    faiss.normalize_L2(x)
    try:
        fi = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        why = str(e).strip().splitlines()[-1]
        raise InputError(f"--faiss {spec!r} ({factory}): faiss cannot build it: {why}") from None
    if not fi.is_trained:
        fi.train(x)
    fi.add(x)
    atomic_write(path, lambda tmp: faiss.write_index(fi, tmp))
    return path


def faiss_topk(path: str, queries, k: int, nprobe: int | None = None):
    faiss = _faiss()
    fi = faiss.read_index(path)
    if nprobe is not None and hasattr(faiss, "extract_index_ivf"):
        try:
            faiss.extract_index_ivf(fi).nprobe = nprobe
        except RuntimeError:
            pass  # not an IVF index
    q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    faiss.normalize_L2(q)
    return fi.search(q, k)


def search(
    folder: str,
    *,
    text: list[str] | None = None,
    images: list[str] | None = None,
    ids: list[str] | None = None,
    queries=None,
    k: int = 10,
    tower: str | None = None,
    model: str | None = None,
    faiss: str | None = None,
    nprobe: int | None = None,
    device: str | None = None,
    backend: str | None = None,
) -> list[list[Hit]]:
    """Top-k samples of the index per query (text, image files, ids of indexed samples, or raw query vectors);
    one list of Hits per query, best first."""
    index = EmbeddingIndex(folder)
    tower = index.check_tower(tower)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"--k must be a positive integer, got {k!r}")
    given = [x is not None for x in (text, images, ids, queries)]
    if sum(given) != 1:
        raise InputError("give exactly one of --text, --image, --ids (or query vectors)")
    if ids is not None:
        q = index.lookup_ids(list(ids), tower)
    elif queries is not None:
        q = np.asarray(queries, dtype=np.float32)
    else:
        q = encode_queries(index, model, text=text, images=images, device=device, backend=backend)
    if q.ndim != 2 or q.shape[1] != index.manifest["dims"][tower]:
        raise InputError(f"queries must be (Q, {index.manifest['dims'][tower]}), got {tuple(q.shape)}")
    total = int(index.offsets[-1])
    k = min(k, total)
    if faiss:
        scores, rows = faiss_topk(build_faiss_index(index, tower, faiss), q, k, nprobe)
    else:
        scores, rows = exact_topk(index, q, k, tower, backend=backend)
    return [[index.hit(qi, r, float(scores[qi, r]), int(rows[qi, r])) for r in range(rows.shape[1]) if rows[qi, r] >= 0]
            for qi in range(len(q))]  # fmt: skip


def encode_queries(index: EmbeddingIndex, model: str | None, *, text=None, images=None, device=None, backend=None):
    """Query embeddings with the run's own model, preprocessing and tokenizer (fp32)."""
    from .pipeline import TowerRunner, text_length
    from .reader import ImagePreprocessor, decode_image

    run = index.manifest["run"]
    model = model or run["model"]
    tower = "text" if text is not None else "image"
    runner = TowerRunner(model, (tower,), device=device, dtype="fp32", backend=backend or "auto", cuda_graphs=False)
    import torch

    if tower == "text":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
        enc = tok(list(text), padding="max_length", max_length=text_length(runner.config), truncation=True,
                  return_tensors="pt")  # fmt: skip
        batch = {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}
    else:
        pre = ImagePreprocessor.from_checkpoint(model, runner.config)
        px = []
        for p in images:
            if not os.path.isfile(p):
                raise InputError(f"--image {p!r} does not exist")
            try:
                px.append(pre(decode_image(("file", p))))
            except Exception as e:  # noqa: BLE001 - PIL raises several types for unreadable files
                raise InputError(f"--image {p!r} cannot be decoded: {e}") from None
        batch = {"pixel_values": torch.from_numpy(np.stack(px))}
    out = runner.run(batch)[tower]
    return out.float().cpu().numpy()

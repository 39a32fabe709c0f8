"""`fastenc search`: exact top-k cosine over an embedding folder written by `fastenc embed`, streamed shard by shard.

Per shard, `fastenc.ops.topk_cosine(queries, shard, min(k, rows))` (itself chunked over the shard's rows), then a
merge with the running top-k: the running list (lower global rows) goes first into a stable sort, so the result -
ties included - equals topk_cosine over all shards concatenated. Memory: one shard's rows plus O(Q * k), never the
(Q, N) similarity matrix. Global row r is the r-th successful sample in index order (shard by shard).

Only real scores are ranked: a stored row holding a NaN or an inf (older stores were written before embed refused
them) is skipped - never ranked, by the exact search or FAISS - and counted in the result's `skipped` and in a
warning; topk_cosine itself would rank a NaN row first (torch.sort puts NaN above every number), so rows are masked
before the op. A query that is not finite is refused. Everything read from the folder is untrusted: manifest.json,
shard files and metadata are checked against each other (rows, width, dtype) and a mismatch is an InputError naming
the file.

FAISS (optional, `pip install 'fastenc[faiss]'`): `faiss_index` trains an index_factory index (inner product over
L2-normalised finite rows, e.g. "IVF-PQ" = IVF{~4 sqrt N},PQ{dim/4}, 4-bit codes below ~10k rows) from the shards
and saves it in the folder as faiss-<tower>-<spec>.index with a sidecar faiss-<tower>-<spec>.json (the spec, the
factory string, rows, width, the skipped rows, a digest of the store - manifest.json's bytes and each shard file's
name, size and mtime - and the sha256 of the index file). A kept index is served only when its sidecar matches the
store and the file's own digest; a stale or foreign one is rebuilt. `search(..., faiss=spec)` uses it (approximate
for IVF / PQ specs; "Flat" is exact). An index too small to train (IVF-PQ below IVFPQ_MIN_ROWS finite rows, or a
factory string faiss cannot train on the rows there are) falls back to the exact search with a warning.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..core.errors import InputError
from .shards import MANIFEST, atomic_write, load_embeddings

TOWER_NAMES = ("image", "text")
META_COLUMNS = ("index", "id", "path", "caption", "row", "error")
FAISS_FORMAT = "fastenc-faiss/1"
PQ4_CENTROIDS = 16  # the IVF-PQ spec's smallest codebooks: 4-bit codes, 16 centroids per sub-quantizer
IVFPQ_MIN_ROWS = 39 * PQ4_CENTROIDS  # faiss's own rule: >= 39 training points per centroid (624 rows)


class SearchWarning(UserWarning):
    """`fastenc.embed.search.search` skipped rows that are not finite, or fell back from FAISS to the exact search."""


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


class SearchResult(list):
    """search()'s answer: one list of Hits per query, best first (a list), plus
    skipped: how many stored rows were not searched because they are not finite (NaN or inf),
    skipped_rows: their global rows, warnings: what the search warned about, method: "exact" or "faiss <factory>"."""

    def __init__(self, hits, *, skipped_rows=(), warnings=(), method="exact"):
        super().__init__(hits)
        self.skipped_rows = [int(r) for r in skipped_rows]
        self.skipped = len(self.skipped_rows)
        self.warnings = list(warnings)
        self.method = method


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[-1].strip()}" if text else type(e).__name__


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class EmbeddingIndex:
    """An output folder of `fastenc embed`: its manifest, shard files and metadata, each checked when read (an
    InputError naming the file for garbage, a missing file, or rows / widths that disagree with the manifest)."""

    def __init__(self, folder: str):
        path = os.path.join(folder, MANIFEST)
        if not os.path.isfile(path):
            raise InputError(f"--index {folder!r} has no {MANIFEST}: not a finished `fastenc embed` output folder")
        self.folder = folder
        self.manifest_path = path
        try:
            with open(path, "rb") as f:
                self.manifest_bytes = f.read()
            manifest = json.loads(self.manifest_bytes.decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise InputError(f"--index: {path!r} is not a readable JSON manifest ({_first_line(e)})") from None
        self.manifest = manifest
        self._check_manifest()
        self.towers = manifest["towers"]
        self.shards = manifest["shards"]
        self.rows = [s["rows"] for s in self.shards]
        self.offsets = np.cumsum([0, *self.rows])
        self._meta: dict[int, dict] = {}
        self._nonfinite: dict[str, dict[int, np.ndarray]] = {}  # tower -> shard position -> local rows skipped

    def _bad(self, what: str) -> InputError:
        return InputError(f"--index: {self.manifest_path!r} {what}; not a `fastenc embed` manifest")

    def _check_manifest(self) -> None:
        m = self.manifest
        if not isinstance(m, dict):
            raise self._bad(f"holds a JSON {type(m).__name__}, not an object")
        fmt = m.get("format")
        if not (isinstance(fmt, str) and fmt.startswith("fastenc-embeddings/")):
            raise self._bad(f"has format {fmt!r} (expected 'fastenc-embeddings/N')")
        towers = m.get("towers")
        if not (isinstance(towers, list) and towers and all(t in TOWER_NAMES for t in towers)):
            raise self._bad(f"lists towers {towers!r} (expected a non-empty list of {', '.join(TOWER_NAMES)})")
        if not isinstance(m.get("dims"), dict):
            raise self._bad(f"has dims {m.get('dims')!r} (expected an object tower -> width)")
        shards = m.get("shards")
        if not isinstance(shards, list):
            raise self._bad(f"has shards {shards!r} (expected a list)")
        for i, s in enumerate(shards):
            if not isinstance(s, dict) or not _is_count(s.get("rows")) or not _is_count(s.get("shard")):
                raise self._bad(f"shard entry {i} is {s!r} (expected shard and rows counts)")
            files = s.get("files")
            if not isinstance(files, dict):
                raise self._bad(f"shard entry {i} has no files object")
            for kind in (*towers, "meta"):
                name = files.get(kind)
                if not isinstance(name, str) or not name or os.path.basename(name) != name or name.startswith("."):
                    raise self._bad(f"shard entry {i} names {kind} file {name!r} (expected a file name in the folder)")
        if not isinstance(m.get("run", {}), dict):
            raise self._bad(f"has run {m.get('run')!r} (expected an object)")

    @property
    def total(self) -> int:
        return int(self.offsets[-1])

    def dim(self, tower: str) -> int:
        d = self.manifest["dims"].get(tower)
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            if self.total == 0:
                raise InputError(f"--index {self.folder!r} holds no {tower} embeddings (0 rows: an empty input, or "
                                 "every sample failed)")  # fmt: skip
            raise self._bad(f"gives the {tower} width as {d!r} (expected a positive integer)")
        return d

    def check_tower(self, tower: str | None) -> str:
        if tower is None:
            return "image" if "image" in self.towers else self.towers[0]
        if tower not in self.towers:
            raise InputError(f"--tower {tower!r}: the index holds {', '.join(self.towers)} embeddings only")
        return tower

    def file(self, i: int, kind: str) -> str:
        return os.path.join(self.folder, self.shards[i]["files"][kind])

    def shard_embeddings(self, tower: str, i: int) -> np.ndarray:
        """Shard i's (rows, dim) stored embeddings as they are on disk (memory-mapped for .npy), checked against the
        manifest: the file exists and parses, is 2-D floating point with the manifest's rows and width."""
        path = self.file(i, tower)
        if not os.path.isfile(path):
            raise InputError(f"--index: shard file {path!r} is missing ({MANIFEST} lists it)")
        try:
            x = load_embeddings(path)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - numpy / pyarrow raise several types for garbage or truncated files
            raise InputError(f"--index: {path!r} cannot be read as {tower} embeddings ({_first_line(e)})") from None
        if not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype.kind != "f":
            what = f"a {x.ndim}-D {x.dtype} array" if isinstance(x, np.ndarray) else type(x).__name__
            raise InputError(f"--index: {path!r} holds {what}, not (rows, dim) floating-point embeddings")
        rows, dim = self.rows[i], self.dim(tower)
        if x.shape != (rows, dim):
            raise InputError(f"--index: {path!r} holds {x.shape[0]} x {x.shape[1]} embeddings but {MANIFEST} says "
                             f"{rows} x {dim}")  # fmt: skip
        return x

    def finite_rows(self, tower: str, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(shard i's finite rows as float32, their local rows or None when every row is finite); the others are
        recorded as skipped."""
        x = np.array(self.shard_embeddings(tower, i), dtype=np.float32)
        ok = np.isfinite(x).all(axis=1)
        if ok.all():
            self._nonfinite.setdefault(tower, {}).pop(i, None)
            return x, None
        keep = np.flatnonzero(ok)
        self._nonfinite.setdefault(tower, {})[i] = np.flatnonzero(~ok)
        return x[keep], keep

    def skipped_rows(self, tower: str) -> list[int]:
        """Global rows found not finite (NaN or inf) so far, ascending."""
        bad = self._nonfinite.get(tower, {})
        return sorted(int(self.offsets[i]) + int(r) for i, rows in bad.items() for r in rows)

    def meta(self, i: int) -> dict:
        """Shard i's metadata as columns, with the successful rows' positions (row -> metadata position); checked
        against the manifest and the embeddings (its successful rows are 0..rows-1 in order)."""
        if i not in self._meta:
            import pyarrow.parquet as pq

            path = self.file(i, "meta")
            if not os.path.isfile(path):
                raise InputError(f"--index: metadata file {path!r} is missing ({MANIFEST} lists it)")
            try:
                m = pq.read_table(path).to_pydict()
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for garbage files
                raise InputError(f"--index: {path!r} cannot be read as shard metadata ({_first_line(e)})") from None
            missing = [c for c in META_COLUMNS if c not in m]
            if missing:
                raise InputError(f"--index: {path!r} lacks the metadata column(s) {', '.join(missing)}")
            rows = m["row"]
            if not all(isinstance(r, int) for r in rows):
                raise InputError(f"--index: {path!r} has a 'row' column that is not all integers")
            ok = [r for r in rows if r >= 0]
            if ok != list(range(self.rows[i])):
                n = self.rows[i]
                raise InputError(f"--index: {path!r} lists {len(ok)} successful row(s) but {MANIFEST} and the "
                                 f"embeddings hold {n} (rows must be 0..{n - 1} in order)")  # fmt: skip
            m["by_row"] = {r: j for j, r in enumerate(rows) if r >= 0}
            self._meta[i] = m
        return self._meta[i]

    def locate(self, global_row: int) -> tuple[int, int]:
        s = int(np.searchsorted(self.offsets, global_row, side="right")) - 1
        return s, int(global_row - self.offsets[s])

    def lookup_ids(self, ids: list[str], tower: str) -> np.ndarray:
        """The stored embeddings of samples by id (InputError for an id not in the index, one that failed, or one
        whose stored embedding is not finite)."""
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
                    v = np.array(emb[r], dtype=np.float32)
                    if not np.isfinite(v).all():
                        raise InputError(f"--ids: the stored {tower} embedding of sample {x!r} is not finite (NaN or "
                                         "inf), so it cannot be a query; re-embed that sample")  # fmt: skip
                    want[x] = v
        missing = [x for x, v in want.items() if v is None]
        if missing:
            raise InputError(f"--ids: {len(missing)} id(s) not in the index, e.g. {missing[:3]}")
        return np.stack([want[x] for x in ids])

    def hit(self, q: int, rank: int, score: float, global_row: int) -> Hit:
        s, r = self.locate(global_row)
        m = self.meta(s)
        j = m["by_row"][r]
        return Hit(q, rank, score, m["id"][j], m["path"][j], m["caption"][j], self.shards[s]["shard"], r, m["index"][j])

    def describe_rows(self, rows: list[int], limit: int = 3) -> str:
        """'id 's3' (shard 0 row 2), ...' for the first `limit` global rows."""
        out = []
        for g in rows[:limit]:
            s, r = self.locate(g)
            m = self.meta(s)
            out.append(f"id {m['id'][m['by_row'][r]]!r} (shard {self.shards[s]['shard']} row {r})")
        return ", ".join(out) + (", ..." if len(rows) > limit else "")


def exact_topk(index: EmbeddingIndex, queries, k: int, tower: str, *, backend: str | None = None):
    """(scores (Q, k'), global rows (Q, k')) with k' = min(k, finite rows in the index), streamed over the shards.
    Rows that are not finite are masked out before topk_cosine (which would rank a NaN first) and recorded in
    index.skipped_rows(tower); the result equals brute force over the finite rows, ties by ascending row."""
    import torch

    from ..ops import topk_cosine

    q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
    best_v = best_i = None
    for i in range(len(index.shards)):
        if index.rows[i] == 0:
            continue
        x, keep = index.finite_rows(tower, i)  # one shard in memory
        n = len(x)
        if n == 0:
            continue
        v, idx = topk_cosine(q, torch.from_numpy(x), min(k, n), backend=backend)
        if keep is not None:  # local positions among the finite rows -> shard rows (ascending: ties keep their order)
            idx = torch.from_numpy(keep)[idx]
        idx = idx + int(index.offsets[i])
        if best_v is not None:  # running top-k first: a stable sort keeps ties in ascending global row
            v, idx = torch.cat([best_v, v], 1), torch.cat([best_i, idx], 1)
            v, order = torch.sort(v, dim=1, descending=True, stable=True)
            v, idx = v[:, :k], torch.gather(idx, 1, order[:, :k])
        best_v, best_i = v, idx
    if best_v is None:
        skipped = len(index.skipped_rows(tower))
        why = f"all {skipped} stored rows are not finite (NaN or inf)" if skipped else "every sample failed"
        raise InputError(f"--index {index.folder!r} holds no searchable {tower} embeddings ({why})")
    return best_v.numpy(), best_i.numpy()


def faiss_spec(spec: str, n: int, dim: int) -> str:
    """'IVF-PQ' -> an index_factory string sized for n rows of width dim; anything else is passed through."""
    if not is_ivfpq(spec):
        return spec
    nlist = max(1, min(65536, int(4 * math.sqrt(n)), n // 39))
    m = next(m for m in (dim // 4, dim // 8, 16, 8, 4, 2, 1) if m >= 1 and dim % m == 0)
    bits = "" if n >= 39 * 256 else "x4"  # 8-bit codebooks want >= 39 x 256 training rows (faiss's own rule)
    return f"IVF{nlist},PQ{m}{bits}"


def is_ivfpq(spec: str) -> bool:
    return spec.upper() in ("IVF-PQ", "IVFPQ")


def _faiss():
    try:
        import faiss
    except ImportError:
        raise InputError("--faiss needs the faiss package: pip install 'fastenc[faiss]'") from None
    return faiss


def faiss_paths(index: EmbeddingIndex, tower: str, spec: str) -> tuple[str, str]:
    """(faiss-<tower>-<spec>.index, its sidecar .json) in the index folder; the spec is sanitised for a file name
    (the sidecar records the exact spec, so two specs with one file name rebuild rather than mix)."""
    safe = re.sub(r"[^A-Za-z0-9_.=+-]", "_", spec.replace(",", "_"))[:120]
    base = os.path.join(index.folder, f"faiss-{tower}-{safe}")
    return base + ".index", base + ".json"


def store_digest(index: EmbeddingIndex, tower: str) -> str:
    """sha256 over manifest.json's bytes and each of the tower's shard files' name, size and mtime_ns."""
    h = hashlib.sha256(index.manifest_bytes)
    for i in range(len(index.shards)):
        path = index.file(i, tower)
        try:
            st = os.stat(path)
        except OSError:
            raise InputError(f"--index: shard file {path!r} is missing ({MANIFEST} lists it)") from None
        h.update(f"\0{os.path.basename(path)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


class _RowMap:
    """FAISS positions (the finite rows in order) -> global rows, from the sorted skipped rows (O(skipped) memory)."""

    def __init__(self, skipped: list[int]):
        s = np.asarray(sorted(skipped), dtype=np.int64)
        self.shift = s - np.arange(len(s), dtype=np.int64)

    def __call__(self, pos: np.ndarray) -> np.ndarray:
        if not len(self.shift):
            return pos
        g = pos + np.searchsorted(self.shift, pos, side="right")
        return np.where(pos >= 0, g, -1)


def _load_kept_faiss(faiss, index_path: str, side_path: str, want: dict):
    """The kept FAISS index and its sidecar when both exist and match `want` (store digest, spec, rows, width)
    and the index file's sha256; None otherwise."""
    try:
        with open(side_path, "rb") as f:
            side = json.loads(f.read().decode("utf-8"))
        if not isinstance(side, dict) or any(side.get(k) != v for k, v in want.items()):
            return None
        with open(index_path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != side.get("index_sha256"):
            return None
        skipped, added = side.get("skipped_rows"), side.get("added")
        if not (isinstance(skipped, list) and all(_is_count(r) for r in skipped) and _is_count(added)):
            return None
        if added + len(skipped) != want["rows"]:
            return None
        fi = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if fi.d != want["dim"] or fi.ntotal != added:
            return None
    except (OSError, ValueError, RuntimeError):
        return None
    return fi, side


def faiss_index(index: EmbeddingIndex, tower: str, spec: str, warn: Callable[[str], None]):
    """(FAISS index, _RowMap, factory) over the tower's finite rows - the kept one when it verifies against the
    store, else trained, filled and saved (index file, then its sidecar) - or None when the index is too small to
    train (warned: the caller searches exactly)."""
    faiss = _faiss()
    dim = index.dim(tower)
    index_path, side_path = faiss_paths(index, tower, spec)
    want = {"format": FAISS_FORMAT, "tower": tower, "spec": spec, "dim": dim, "rows": index.total,
            "store": store_digest(index, tower)}  # fmt: skip
    kept = _load_kept_faiss(faiss, index_path, side_path, want)
    if kept is not None:
        fi, side = kept
        index._nonfinite[tower] = {}
        for g in side["skipped_rows"]:
            s, r = index.locate(g)
            index._nonfinite[tower].setdefault(s, []).append(r)
        return fi, _RowMap(side["skipped_rows"]), side["factory"]
    if is_ivfpq(spec) and index.total < IVFPQ_MIN_ROWS:  # too small whatever is finite: no need to read the shards
        warn(_too_small(spec, index.total))
        return None
    if os.path.exists(index_path):
        warn(f"--faiss {spec!r}: {index_path} does not match this index's store as it is now (stale, foreign, "
             "damaged, or kept by an older fastenc without its record); rebuilding it")  # fmt: skip
    parts = [index.finite_rows(tower, i)[0] for i in range(len(index.shards)) if index.rows[i]]
    skipped = index.skipped_rows(tower)
    x = np.ascontiguousarray(np.concatenate(parts)) if parts else np.zeros((0, dim), np.float32)
    n = len(x)
    if n == 0:
        why = f"all {len(skipped)} stored rows are not finite (NaN or inf)" if skipped else "every sample failed"
        raise InputError(f"--index {index.folder!r} holds no searchable {tower} embeddings ({why})")
    if is_ivfpq(spec) and n < IVFPQ_MIN_ROWS:
        warn(_too_small(spec, n))
        return None
    factory = faiss_spec(spec, n, dim)
    faiss.normalize_L2(x)
    try:
        fi = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        why = str(e).strip().splitlines()[-1]
        raise InputError(f"--faiss {spec!r} ({factory}): faiss cannot build it: {why}") from None
    if not fi.is_trained:
        try:
            fi.train(x)
        except RuntimeError as e:
            why = str(e).strip().splitlines()[-1].split("failed: ")[-1]
            warn(f"--faiss {spec!r} ({factory}): faiss cannot train it on the {n} finite rows there are ({why}); "
                 "searching exactly instead")  # fmt: skip
            return None
    fi.add(x)
    data = np.asarray(faiss.serialize_index(fi), dtype=np.uint8).tobytes()
    side = {**want, "factory": factory, "added": n, "skipped_rows": skipped,
            "index_sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip

    def write(tmp, payload):
        with open(tmp, "wb") as f:
            f.write(payload)

    try:
        atomic_write(index_path, lambda tmp: write(tmp, data))
        atomic_write(side_path, lambda tmp: write(tmp, (json.dumps(side, indent=1) + "\n").encode()))
    except OSError as e:  # a read-only index folder: serve the fresh index without keeping it
        warn(f"--faiss {spec!r}: could not keep the FAISS index in {index.folder!r} ({_first_line(e)}); it is "
             "rebuilt on every search")  # fmt: skip
    return fi, _RowMap(skipped), factory


def _too_small(spec: str, n: int) -> str:
    return (f"--faiss {spec!r}: IVF-PQ needs at least {IVFPQ_MIN_ROWS} finite rows to train (39 per centroid of "
            f"its {PQ4_CENTROIDS}-centroid 4-bit codebooks), the index has {n}; searching exactly instead")  # fmt: skip


def faiss_topk(fi, rowmap: _RowMap, queries, k: int, nprobe: int | None = None):
    faiss = _faiss()
    if nprobe is not None and hasattr(faiss, "extract_index_ivf"):
        try:
            faiss.extract_index_ivf(fi).nprobe = nprobe
        except RuntimeError:
            pass  # not an IVF index
    q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    faiss.normalize_L2(q)
    scores, pos = fi.search(q, min(k, fi.ntotal))
    return scores, rowmap(pos)


def _check_queries(q: np.ndarray, labels: list[str]) -> None:
    bad = np.flatnonzero(~np.isfinite(q).all(axis=1))
    if len(bad):
        raise InputError(f"{labels[bad[0]]}: the query embedding is not finite (NaN or inf); it cannot be searched")


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
    on_warning: Callable[[str], None] | None = None,
) -> SearchResult:
    """Top-k samples of the index per query (text, image files, ids of indexed samples, or raw query vectors);
    one list of Hits per query, best first, as a SearchResult (also .skipped: stored rows not searched because
    they are not finite). Warnings (skipped rows, a FAISS fall-back) go to on_warning, or warnings.warn as
    SearchWarning when it is None."""
    said: list[str] = []

    def warn(msg: str) -> None:
        said.append(msg)
        if on_warning is None:
            warnings.warn(msg, SearchWarning, stacklevel=3)
        else:
            on_warning(msg)

    index = EmbeddingIndex(folder)
    tower = index.check_tower(tower)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"--k must be a positive integer, got {k!r}")
    given = [x is not None for x in (text, images, ids, queries)]
    if sum(given) != 1:
        raise InputError("give exactly one of --text, --image, --ids (or query vectors)")
    for flag, value in (("--text", text), ("--image", images), ("--ids", ids)):
        if value is not None and len(value) == 0:
            raise InputError(f"{flag}: no queries given (an empty list)")
    if index.total == 0:
        raise InputError(f"--index {folder!r} holds no {tower} embeddings (0 rows: an empty input, or every sample "
                         "failed)")  # fmt: skip
    dim = index.dim(tower)
    if ids is not None:
        q = index.lookup_ids(list(ids), tower)
        labels = [f"--ids sample {x!r}" for x in ids]
    elif queries is not None:
        try:
            q = np.asarray(queries, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise InputError(f"queries must be a (Q, {dim}) float array ({_first_line(e)})") from None
        labels = [f"queries row {i}" for i in range(len(q))] if q.ndim else []
    else:
        q = encode_queries(index, model, text=text, images=images, device=device, backend=backend)
        labels = [f"--text {t!r}" for t in text] if text is not None else [f"--image {p!r}" for p in images]
    if q.ndim != 2 or q.shape[1] != dim:
        raise InputError(f"queries must be (Q, {dim}), got {tuple(q.shape)}")
    if q.shape[0] == 0:
        raise InputError(f"queries: no queries given (shape {tuple(q.shape)})")
    _check_queries(q, labels)
    k = min(k, index.total)
    method = "exact"
    built = faiss_index(index, tower, faiss, warn) if faiss else None
    if built is not None:
        fi, rowmap, factory = built
        scores, rows = faiss_topk(fi, rowmap, q, k, nprobe)
        method = f"faiss {factory}"
    else:
        scores, rows = exact_topk(index, q, k, tower, backend=backend)
    skipped = index.skipped_rows(tower)
    if skipped:
        warn(f"skipped {len(skipped)} stored {tower} row(s) that are not finite (NaN or inf), never ranked: "
             f"{index.describe_rows(skipped)}; re-embed those samples")  # fmt: skip
    hits = [[index.hit(qi, r, float(scores[qi, r]), int(rows[qi, r])) for r in range(rows.shape[1]) if rows[qi, r] >= 0]
            for qi in range(len(q))]  # fmt: skip
    return SearchResult(hits, skipped_rows=skipped, warnings=said, method=method)


def encode_queries(index: EmbeddingIndex, model: str | None, *, text=None, images=None, device=None, backend=None):
    """Query embeddings with the run's own model, preprocessing and tokenizer (fp32)."""
    from .pipeline import TowerRunner, text_positions
    from .reader import ImagePreprocessor, decode_image

    run = index.manifest.get("run", {})
    model = model or run.get("model")
    if not isinstance(model, str) or not model:
        raise InputError(f"--model: {index.manifest_path!r} names no model (run.model); pass --model DIR")
    tower = "text" if text is not None else "image"
    runner = TowerRunner(model, (tower,), device=device, dtype="fp32", backend=backend or "auto", cuda_graphs=False)
    import torch

    if tower == "text":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
        enc = tok(list(text), padding="max_length", max_length=text_positions(runner.config), truncation=True,
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

"""fastenc search ranks only real scores and trusts nothing it reads from the index folder: stored rows that are not
finite are skipped and counted (exact and FAISS), a non-finite query is refused; a damaged store (garbage
manifest.json, a missing / truncated / garbage shard or metadata file, shapes that disagree) is an InputError naming
the file (one CLI error line, exit 2); `--faiss` on an index too small to train falls back to the exact search with
a warning; a kept FAISS index is served only for the store it was built from (stale, foreign or garbage: rebuilt).

The stores are written here directly with numpy / pyarrow in the documented layout (fastenc/embed/shards.py), so an
"older store" holding NaN rows is what an older `fastenc embed` could leave, whatever the writer refuses today."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from fastenc.cli import main
from fastenc.core.errors import InputError
from fastenc.embed.search import IVFPQ_MIN_ROWS, SearchWarning, search

pa = pytest.importorskip("pyarrow", reason="fastenc embed writes Parquet metadata: pip install 'fastenc[embed]'")
pq = pytest.importorskip("pyarrow.parquet")


def write_store(out, x, *, shard_size=40, failed=(), fmt="npy", store="fp32", tower="image"):
    """A `fastenc embed` output folder for samples 0..n-1 with embeddings x (n, dim); `failed` samples have no row.
    Returns (stored rows as float32 in global-row order, their ids)."""
    os.makedirs(out, exist_ok=True)
    n, dim = x.shape
    dtype = np.float16 if store == "fp16" else np.float32
    entries, kept = [], []
    for s, a in enumerate(range(0, n, shard_size)):
        idx = list(range(a, min(a + shard_size, n)))
        ok = [i for i in idx if i not in set(failed)]
        files = {tower: f"{tower}-{s:05d}.{'parquet' if fmt == 'parquet' else 'npy'}", "meta": f"meta-{s:05d}.parquet"}
        emb = np.ascontiguousarray(x[ok].astype(dtype)).reshape(len(ok), dim)
        path = os.path.join(out, files[tower])
        if fmt == "parquet":
            flat = pa.array(emb.reshape(-1), type=pa.float16() if store == "fp16" else pa.float32())
            tbl = pa.table({"index": pa.array(ok, type=pa.int64()), "id": pa.array([f"s{i}" for i in ok]),
                            "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)})  # fmt: skip
            pq.write_table(tbl, path)
        else:
            np.save(path, emb)
        row_of = {i: r for r, i in enumerate(ok)}
        meta = pa.table(
            {
                "index": pa.array(idx, type=pa.int64()),
                "id": pa.array([f"s{i}" for i in idx], type=pa.string()),
                "path": pa.array([f"p{i}" for i in idx], type=pa.string()),
                "caption": pa.array([f"c{i}" for i in idx], type=pa.string()),
                "shard": pa.array([s] * len(idx), type=pa.int32()),
                "row": pa.array([row_of.get(i, -1) for i in idx], type=pa.int32()),
                "error": pa.array([None if i in row_of else "ValueError: synthetic" for i in idx], type=pa.string()),
            }
        )
        pq.write_table(meta, os.path.join(out, files["meta"]))
        entries.append({"shard": s, "start": a, "stop": idx[-1] + 1, "rows": len(ok), "errors": len(idx) - len(ok),
                        "files": files})  # fmt: skip
        kept += ok
    manifest = {"format": "fastenc-embeddings/1", "run": {"model": "none", "samples": n}, "towers": [tower],
                "dims": {tower: dim} if entries else {}, "samples": n, "rows": len(kept), "errors": n - len(kept),
                "shards": entries}  # fmt: skip
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return x[kept].astype(dtype).astype(np.float32), [f"s{i}" for i in kept]


def poisoned(n=230, dim=16, seed=0):
    """Random rows with NaN / +inf / -inf rows (a lone NaN among finite values too) and exact-duplicate ties."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x[150] = x[10]
    x[200] = 3 * x[10]
    bad = {3: np.nan, 41: np.inf, 42: -np.inf, 120: np.nan}
    for i, v in bad.items():
        x[i] = v
    x[77, 5] = np.nan
    return x, sorted([*bad, 77])


def finite_brute_force(queries, stored, k):
    """Top-k over the finite rows only: (scores, global rows), ties by ascending row."""
    keep = np.flatnonzero(np.isfinite(stored).all(1))
    sims = (
        torch.nn.functional.normalize(torch.from_numpy(queries), dim=-1)
        @ torch.nn.functional.normalize(torch.from_numpy(stored[keep]), dim=-1).T
    )
    v, i = torch.sort(sims, dim=1, descending=True, stable=True)
    return v[:, :k].numpy(), keep[i[:, :k].numpy()]


def assert_hits(hits, stored, ids, q, k):
    v, rows = finite_brute_force(q, stored, min(k, int(np.isfinite(stored).all(1).sum())))
    for qi in range(len(q)):
        assert [h.id for h in hits[qi]] == [ids[j] for j in rows[qi]]
        np.testing.assert_allclose([h.score for h in hits[qi]], v[qi], rtol=1e-5, atol=1e-6)
        assert all(np.isfinite(h.score) for h in hits[qi])


def one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastenc search: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---- non-finite stored rows and queries ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,store", [("npy", "fp32"), ("npy", "fp16"), ("parquet", "fp32")])
@pytest.mark.parametrize("k", [1, 7, 500])
def test_nonfinite_rows_never_rank(tmp_path, fmt, store, k):
    x, bad_samples = poisoned()
    stored, ids = write_store(tmp_path, x, failed={7, 8, 100}, fmt=fmt, store=store)
    bad_rows = [ids.index(f"s{i}") for i in bad_samples]
    assert not np.isfinite(stored[bad_rows]).all(1).any()
    rng = np.random.default_rng(1)
    q = rng.standard_normal((4, 16)).astype(np.float32)
    q[0] = stored[ids.index("s10")]  # its duplicates tie: s10 < s150 < s200
    with pytest.warns(SearchWarning, match=r"skipped 5 stored image row\(s\) that are not finite"):
        hits = search(str(tmp_path), queries=q, k=k)
    assert hits.skipped == 5 and hits.skipped_rows == bad_rows and hits.method == "exact"
    assert_hits(hits, stored, ids, q, k)
    if k >= 3:
        assert [h.id for h in hits[0][:3]] == ["s10", "s150", "s200"]
    assert not {h.id for qh in hits for h in qh} & {f"s{i}" for i in bad_samples}


def test_shard_of_only_nonfinite_rows_and_all_nonfinite(tmp_path):
    x = np.random.default_rng(2).standard_normal((60, 8)).astype(np.float32)
    x[20:40] = np.nan  # shard 1: every row NaN
    stored, ids = write_store(tmp_path / "a", x, shard_size=20)
    q = x[[0, 45]] + 0.01
    hits = search(str(tmp_path / "a"), queries=q, k=100, on_warning=lambda m: None)
    assert hits.skipped == 20 and len(hits.warnings) == 1
    assert_hits(hits, stored, ids, q, 100)
    write_store(tmp_path / "b", np.full((10, 8), np.inf, np.float32))
    with pytest.raises(InputError, match=r"no searchable image embeddings \(all 10 stored rows are not finite"):
        search(str(tmp_path / "b"), queries=q, k=3, on_warning=lambda m: None)


def test_nonfinite_query_is_refused(tmp_path):
    x, _ = poisoned()
    write_store(tmp_path, x)
    q = np.ones((3, 16), np.float32)
    q[1, 4] = np.nan
    with pytest.raises(InputError, match=r"queries row 1: the query embedding is not finite"):
        search(str(tmp_path), queries=q, k=3)
    q[1, 4] = np.inf
    with pytest.raises(InputError, match=r"queries row 1: the query embedding is not finite"):
        search(str(tmp_path), queries=q, k=3)
    with pytest.raises(InputError, match=r"--ids: the stored image embedding of sample 's3' is not finite"):
        search(str(tmp_path), ids=["s0", "s3"], k=3)


def test_cli_counts_skipped_rows(tmp_path, capsys):
    x, _ = poisoned()
    write_store(tmp_path / "idx", x)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("s10\n")
    assert main(["search", "--index", str(tmp_path / "idx"), "--ids", str(ids_file), "--k", "500", "--json"]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 230 - 5 and [r["id"] for r in rows[:3]] == ["s10", "s150", "s200"]
    assert all(np.isfinite(r["score"]) for r in rows)
    assert err.startswith("fastenc search: warning: skipped 5 stored image row(s) that are not finite")
    assert "id 's3' (shard 0 row 3)" in err and "Traceback" not in err


# ---- zero queries, empty indexes -------------------------------------------------------------------------------


def test_zero_queries(tmp_path):
    write_store(tmp_path, np.ones((5, 16), np.float32))
    with pytest.raises(InputError, match="no queries"):
        search(str(tmp_path), queries=np.zeros((0, 16), np.float32), k=3)
    with pytest.raises(InputError, match="--ids: no queries"):
        search(str(tmp_path), ids=[], k=3)
    with pytest.raises(InputError, match="--text: no queries"):
        search(str(tmp_path), text=[], k=3)
    with pytest.raises(InputError, match=r"queries must be a \(Q, 16\) float array"):
        search(str(tmp_path), queries=[["a"] * 16], k=3)


def test_ids_file_that_is_not_utf8_or_not_a_file_is_one_error_line(tmp_path, capsys):
    write_store(tmp_path / "idx", np.ones((5, 16), np.float32))
    bad = tmp_path / "ids.txt"
    bad.write_bytes(b"s0\n\xff\xfe s1\n")
    assert main(["search", "--index", str(tmp_path / "idx"), "--ids", str(bad)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--ids" in line and "not UTF-8" in line
    assert main(["search", "--index", str(tmp_path / "idx"), "--ids", str(tmp_path)]) == 2
    assert "--ids" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("faiss", [None, "Flat", "IVF-PQ"])
@pytest.mark.parametrize("kind", ["all-failed", "no-samples"])
def test_empty_index_is_one_error_line(tmp_path, capsys, faiss, kind):
    if faiss:
        pytest.importorskip("faiss", reason="pip install 'fastenc[faiss]'")
    x = np.ones((6 if kind == "all-failed" else 0, 16), np.float32)
    write_store(tmp_path / "idx", x, failed=set(range(len(x))))
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("s0\n")
    args = ["search", "--index", str(tmp_path / "idx"), "--ids", str(ids_file)] + (["--faiss", faiss] if faiss else [])
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "holds no image embeddings" in line
    with pytest.raises(InputError, match="holds no image embeddings"):
        search(str(tmp_path / "idx"), queries=np.ones((1, 16), np.float32), k=2, faiss=faiss)


# ---- damaged stores --------------------------------------------------------------------------------------------


def _damage(folder, kind):
    """Damage shard 1 of a store; returns the file that must be named."""
    npy, meta, man = (os.path.join(folder, f) for f in ("image-00001.npy", "meta-00001.parquet", "manifest.json"))
    if kind == "npy-truncated":
        data = open(npy, "rb").read()
        open(npy, "wb").write(data[: len(data) - 100])
    elif kind == "npy-header-cut":
        open(npy, "wb").write(open(npy, "rb").read()[:40])
    elif kind == "npy-garbage":
        open(npy, "wb").write(os.urandom(3000))
    elif kind == "npy-empty":
        open(npy, "wb").close()
    elif kind == "npy-missing":
        os.remove(npy)
    elif kind == "npy-wrong-rows":
        np.save(npy, np.ones((3, 16), np.float32))
    elif kind == "npy-wrong-dim":
        np.save(npy, np.ones((40, 8), np.float32))
    elif kind == "npy-ints":
        np.save(npy, np.ones((40, 16), np.int32))
    elif kind == "npy-3d":
        np.save(npy, np.ones((40, 16, 1), np.float32))
    elif kind == "meta-missing":
        os.remove(meta)
    elif kind == "meta-garbage":
        open(meta, "wb").write(b"PAR1" + os.urandom(500) + b"PAR1")
    elif kind == "meta-truncated":
        data = open(meta, "rb").read()
        open(meta, "wb").write(data[: len(data) // 2])
    elif kind == "meta-wrong-rows":  # the metadata claims 2 successful rows, the manifest / embeddings 40
        t = pq.read_table(meta)
        rows = [r if r < 2 else -1 for r in t.column("row").to_pylist()]
        pq.write_table(t.set_column(t.schema.get_field_index("row"), "row", pa.array(rows, pa.int32())), meta)
    elif kind == "meta-no-column":
        pq.write_table(pq.read_table(meta).drop_columns(["row"]), meta)
    else:
        raise AssertionError(kind)
    return npy if kind.startswith("npy") else meta if kind.startswith("meta") else man


DAMAGE = ["npy-truncated", "npy-header-cut", "npy-garbage", "npy-empty", "npy-missing", "npy-wrong-rows",
          "npy-wrong-dim", "npy-ints", "npy-3d", "meta-missing", "meta-garbage", "meta-truncated", "meta-wrong-rows",
          "meta-no-column"]  # fmt: skip


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_shard_is_an_error_naming_the_file(tmp_path, capsys, kind):
    x = np.random.default_rng(3).standard_normal((120, 16)).astype(np.float32)
    write_store(tmp_path / "idx", x)
    named = _damage(str(tmp_path / "idx"), kind)
    q = x[[50, 60]]  # shard 1's own rows: their hits are in the damaged shard
    with pytest.raises(InputError, match=re.escape(named)):
        search(str(tmp_path / "idx"), queries=q, k=200)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("s0\n")
    assert main(["search", "--index", str(tmp_path / "idx"), "--ids", str(ids_file), "--k", "200"]) == 2
    assert os.path.basename(named) in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("kind", ["npy-truncated", "npy-garbage", "npy-missing", "meta-missing", "npy-wrong-rows"])
def test_damaged_shard_with_faiss_is_an_error_naming_the_file(tmp_path, capsys, kind):
    pytest.importorskip("faiss", reason="pip install 'fastenc[faiss]'")
    x = np.random.default_rng(3).standard_normal((120, 16)).astype(np.float32)
    write_store(tmp_path / "idx", x)
    named = _damage(str(tmp_path / "idx"), kind)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("s0\n")
    assert main(["search", "--index", str(tmp_path / "idx"), "--ids", str(ids_file), "--k", "200", "--faiss",
                 "Flat"]) == 2  # fmt: skip
    assert os.path.basename(named) in one_error_line(capsys.readouterr().err)


MANIFESTS = {
    "not-json": b"{ not json",
    "not-utf8": b"\xff\xfe\x00garbage",
    "a-list": b"[1, 2, 3]",
    "no-towers": json.dumps({"format": "fastenc-embeddings/1", "dims": {}, "shards": []}).encode(),
    "bad-format": json.dumps({"format": "other/1", "towers": ["image"], "dims": {}, "shards": []}).encode(),
    "rows-string": None,  # built from the real manifest below
    "path-escape": None,
    "bad-dim": None,
    "shards-dict": None,
}


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_garbage_manifest_is_an_error_naming_it(tmp_path, capsys, kind):
    write_store(tmp_path / "idx", np.ones((50, 16), np.float32))
    path = tmp_path / "idx" / "manifest.json"
    data = MANIFESTS[kind]
    if data is None:
        m = json.loads(path.read_text())
        if kind == "rows-string":
            m["shards"][1]["rows"] = "10"
        elif kind == "path-escape":
            m["shards"][0]["files"]["image"] = "../../etc/passwd"
        elif kind == "bad-dim":
            m["dims"]["image"] = -3
        else:
            m["shards"] = {"0": m["shards"][0]}
        data = json.dumps(m).encode()
    path.write_bytes(data)
    with pytest.raises(InputError, match="manifest.json"):
        search(str(tmp_path / "idx"), queries=np.ones((1, 16), np.float32), k=2)
    assert main(["search", "--index", str(tmp_path / "idx"), "--text", "a cat"]) == 2
    assert "manifest.json" in one_error_line(capsys.readouterr().err)


# ---- FAISS -----------------------------------------------------------------------------------------------------


@pytest.fixture
def faiss():
    return pytest.importorskip("faiss", reason="pip install 'fastenc[faiss]'")


@pytest.mark.parametrize("n", [5, 15, 100])
def test_faiss_ivfpq_too_small_falls_back_to_exact(tmp_path, capsys, faiss, n):
    x = np.random.default_rng(4).standard_normal((n, 16)).astype(np.float32)
    stored, ids = write_store(tmp_path / "idx", x)
    q = x[[0, n - 1]] + 0.01
    with pytest.warns(SearchWarning, match=rf"IVF-PQ needs at least {IVFPQ_MIN_ROWS} finite rows .* the index has {n}"):
        hits = search(str(tmp_path / "idx"), queries=q, k=4, faiss="IVF-PQ")
    assert hits.method == "exact"
    assert_hits(hits, stored, ids, q, 4)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("s1\n")
    assert main(["search", "--index", str(tmp_path / "idx"), "--ids", str(ids_file), "--faiss", "IVF-PQ"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("query 0: s1") and "Traceback" not in err
    assert err.startswith(f"fastenc search: warning: --faiss 'IVF-PQ': IVF-PQ needs at least {IVFPQ_MIN_ROWS}")


def test_faiss_ivfpq_too_few_finite_rows_falls_back(tmp_path, faiss):
    x = np.random.default_rng(5).standard_normal((IVFPQ_MIN_ROWS + 10, 8)).astype(np.float32)
    x[:20] = np.nan  # enough rows, but not enough finite ones
    stored, ids = write_store(tmp_path, x, shard_size=300)
    q = x[[30, 400]]
    said = []
    hits = search(str(tmp_path), queries=q, k=5, faiss="IVF-PQ", on_warning=said.append)
    assert hits.method == "exact" and hits.skipped == 20
    assert f"the index has {IVFPQ_MIN_ROWS - 10}" in said[0] and "skipped 20" in said[1]
    assert_hits(hits, stored, ids, q, 5)


@pytest.mark.parametrize("spec", ["IVF64,Flat", "PQ4", "IVF2,PQ4"])
def test_faiss_factory_that_cannot_train_falls_back(tmp_path, faiss, spec):
    x = np.random.default_rng(6).standard_normal((30, 16)).astype(np.float32)
    stored, ids = write_store(tmp_path, x)
    q = x[[3, 20]]
    with pytest.warns(SearchWarning, match=r"faiss cannot train it on the 30 finite rows there are .*clusters"):
        hits = search(str(tmp_path), queries=q, k=3, faiss=spec)
    assert hits.method == "exact"
    assert_hits(hits, stored, ids, q, 3)


def test_faiss_skips_nonfinite_rows(tmp_path, faiss):
    x, _ = poisoned()
    stored, ids = write_store(tmp_path, x, failed={7, 8})
    q = np.random.default_rng(7).standard_normal((3, 16)).astype(np.float32)
    for attempt in ("built", "kept"):
        said = []
        hits = search(str(tmp_path), queries=q, k=20, faiss="Flat", on_warning=said.append)
        assert hits.method == "faiss Flat" and hits.skipped == 5, attempt
        assert len(said) == 1 and said[0].startswith("skipped 5 stored image row(s)"), attempt
        assert_hits(hits, stored, ids, q, 20)
    side = json.loads((tmp_path / "faiss-image-Flat.json").read_text())
    assert side["added"] == len(ids) - 5 and len(side["skipped_rows"]) == 5


def test_faiss_ivfpq_with_nonfinite_rows_finds_near_duplicates(tmp_path, faiss):
    x = np.random.default_rng(8).standard_normal((1200, 32)).astype(np.float32)
    x[[5, 300, 301, 899]] = np.nan
    stored, ids = write_store(tmp_path, x, shard_size=300)
    q = x[[6, 400, 900]] + 0.01 * np.random.default_rng(9).standard_normal((3, 32)).astype(np.float32)
    hits = search(str(tmp_path), queries=q, k=10, faiss="IVF-PQ", nprobe=8, on_warning=lambda m: None)
    assert hits.method.startswith("faiss IVF") and hits.skipped == 4
    assert [h[0].id for h in hits] == ["s6", "s400", "s900"]  # the finite rows' positions map back to their ids
    assert not {h.id for qh in hits for h in qh} & {"s5", "s300", "s301", "s899"}


def _exact_ids(folder, q, k):
    return [[h.id for h in qh] for qh in search(folder, queries=q, k=k)]


def test_stale_faiss_index_is_rebuilt(tmp_path, faiss):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((100, 16)).astype(np.float32)
    write_store(tmp_path, x)
    q = rng.standard_normal((3, 16)).astype(np.float32)
    first = search(str(tmp_path), queries=q, k=5, faiss="Flat")
    assert [[h.id for h in qh] for qh in first] == _exact_ids(str(tmp_path), q, 5)
    npy = tmp_path / "image-00001.npy"
    st = os.stat(npy)
    np.save(npy, rng.standard_normal((40, 16)).astype(np.float32))  # same shape and size, new content
    os.utime(npy, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # rewritten a second later
    said = []
    again = search(str(tmp_path), queries=q, k=5, faiss="Flat", on_warning=said.append)
    assert [[h.id for h in qh] for qh in again] == _exact_ids(str(tmp_path), q, 5)
    assert any("does not match this index's store" in m for m in said)


@pytest.mark.parametrize("how", ["index-only", "index-and-sidecar", "over-own", "garbage", "truncated"])
def test_foreign_or_garbage_faiss_index_is_never_served(tmp_path, faiss, how):
    rng = np.random.default_rng(11)
    a, b = tmp_path / "a", tmp_path / "b"
    write_store(a, rng.standard_normal((100, 16)).astype(np.float32))
    write_store(b, rng.standard_normal((100, 16)).astype(np.float32))  # same rows and width, other vectors
    q = rng.standard_normal((3, 16)).astype(np.float32)
    search(str(b), queries=q, k=5, faiss="Flat")
    if how == "over-own":
        search(str(a), queries=q, k=5, faiss="Flat")
    if how in ("index-only", "index-and-sidecar", "over-own"):
        shutil.copy(b / "faiss-image-Flat.index", a / "faiss-image-Flat.index")
        if how == "index-and-sidecar":
            shutil.copy(b / "faiss-image-Flat.json", a / "faiss-image-Flat.json")
    elif how == "garbage":
        (a / "faiss-image-Flat.index").write_bytes(os.urandom(2000))
    else:
        search(str(a), queries=q, k=5, faiss="Flat")
        data = (a / "faiss-image-Flat.index").read_bytes()
        (a / "faiss-image-Flat.index").write_bytes(data[: len(data) // 2])
    hits = search(str(a), queries=q, k=5, faiss="Flat", on_warning=lambda m: None)
    assert [[h.id for h in qh] for qh in hits] == _exact_ids(str(a), q, 5)
    # and the rebuilt one is then kept and served: it verifies
    said = []
    assert [[h.id for h in qh] for qh in search(str(a), queries=q, k=5, faiss="Flat", on_warning=said.append)] == [
        [h.id for h in qh] for qh in hits
    ]
    assert said == []

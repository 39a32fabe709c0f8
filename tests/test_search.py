"""fastenc search: streamed exact top-k over embedding shards equals brute force over everything; queries by text,
image and id through the CLI; FAISS (Flat: exact, IVF-PQ: runs and finds near duplicates)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fastenc.cli import main
from fastenc.core.errors import InputError
from fastenc.embed.reader import SampleTable
from fastenc.embed.search import EmbeddingIndex, search
from fastenc.embed.shards import ShardWriter, plan
from tests.test_embed import clip_dir, folder, reference_embeddings, run_embed  # noqa: F401 - fixtures

pytest.importorskip("pyarrow", reason="fastenc embed writes Parquet metadata: pip install 'fastenc[embed]'")


def synthetic_index(out, n=230, dim=16, shard_size=40, fail_every=7, store="fp32", seed=0):
    """An index written by the real ShardWriter from random vectors: 6 shards, every 7th sample failed, one shard
    with no rows at all, exact duplicates (ties) across shards. Returns the stored rows (float32) and their ids."""
    rng = np.random.default_rng(seed)
    table = SampleTable("synthetic", "mem")
    for i in range(n):
        table.add(f"s{i}", f"p{i}", f"c{i}", None)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x[150] = x[10]  # ties: equal similarity, lower global row first
    x[200] = 3 * x[10]
    writer = ShardWriter(str(out), ("image",), store, "npy")
    run = {"model": "none", "samples": n}
    writer.start(run)
    shards = plan(n, shard_size, 8)
    kept = []
    for s in shards:
        ok = [i for i in range(s.start, s.stop) if i % fail_every and not (80 <= i < 120)]  # shard 2: all failed
        errors = {i: "ValueError: synthetic" for i in range(s.start, s.stop) if i not in ok}
        writer.write(s, table, np.array(ok, dtype=np.int64), errors, {"image": x[ok]})
        kept += ok
    writer.finish(run, shards)
    stored = x[kept].astype(np.float16 if store == "fp16" else np.float32).astype(np.float32)
    return stored, [f"s{i}" for i in kept]


def brute_force(queries, stored, k):
    sims = (
        torch.nn.functional.normalize(torch.from_numpy(queries), dim=-1)
        @ torch.nn.functional.normalize(torch.from_numpy(stored), dim=-1).T
    )
    v, i = torch.sort(sims, dim=1, descending=True, stable=True)
    return v[:, :k].numpy(), i[:, :k].numpy()


@pytest.mark.parametrize("k", [1, 5, 33, 41, 500])
@pytest.mark.parametrize("store", ["fp32", "fp16"])
def test_streamed_topk_equals_brute_force(tmp_path, k, store):
    stored, ids = synthetic_index(tmp_path, store=store)
    rng = np.random.default_rng(1)
    q = rng.standard_normal((4, 16)).astype(np.float32)
    q[0] = stored[ids.index("s10")]  # its duplicates tie: s10 < s150 < s200 in global-row order
    hits = search(str(tmp_path), queries=q, k=k)
    v, i = brute_force(q, stored, min(k, len(ids)))
    for qi in range(len(q)):
        assert [h.id for h in hits[qi]] == [ids[j] for j in i[qi]]
        np.testing.assert_allclose([h.score for h in hits[qi]], v[qi], rtol=1e-5, atol=1e-6)
        assert [h.rank for h in hits[qi]] == list(range(len(i[qi])))
    if k >= 3:
        assert [h.id for h in hits[0][:3]] == ["s10", "s150", "s200"]
    index = EmbeddingIndex(str(tmp_path))
    for h in hits[1][:5]:  # shard / row / caption point at the stored row
        assert np.array_equal(
            index.shard_embeddings("image", index.shards.index(next(s for s in index.shards if s["shard"] == h.shard)))[
                h.row
            ].astype(np.float32),
            stored[ids.index(h.id)],
        )
        assert h.caption == "c" + h.id[1:] and h.index == int(h.id[1:])


def test_ids_queries_and_bad_input(tmp_path):
    stored, ids = synthetic_index(tmp_path)
    hits = search(str(tmp_path), ids=["s3", "s222"], k=3)
    assert hits[0][0].id == "s3" and hits[1][0].id == "s222"
    assert abs(hits[0][0].score - 1.0) < 1e-5
    with pytest.raises(InputError, match="failed during embedding"):
        search(str(tmp_path), ids=["s7"], k=3)
    with pytest.raises(InputError, match="not in the index"):
        search(str(tmp_path), ids=["nope"], k=3)
    with pytest.raises(InputError, match="--k"):
        search(str(tmp_path), ids=["s3"], k=0)
    with pytest.raises(InputError, match="--tower"):
        search(str(tmp_path), ids=["s3"], k=1, tower="text")
    with pytest.raises(InputError, match="exactly one"):
        search(str(tmp_path), k=1)


def test_faiss(tmp_path):
    faiss = pytest.importorskip("faiss", reason="pip install 'fastenc[faiss]'")
    del faiss
    stored, ids = synthetic_index(tmp_path, n=1200, dim=32, shard_size=300, fail_every=11)
    rng = np.random.default_rng(2)
    q = stored[[5, 400, 900]] + 0.01 * rng.standard_normal((3, 32)).astype(np.float32)
    exact = search(str(tmp_path), queries=q, k=10)
    flat = search(str(tmp_path), queries=q, k=10, faiss="Flat")
    for a, b in zip(exact, flat, strict=True):
        assert [h.id for h in a] == [h.id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
    ivfpq = search(str(tmp_path), queries=q, k=10, faiss="IVF-PQ", nprobe=8)
    assert [h[0].id for h in ivfpq] == [ids[5], ids[400], ids[900]]  # the near duplicate is found
    assert any(f.startswith("faiss-image-IVF") for f in os.listdir(tmp_path))


def test_text_image_and_id_queries_through_cli(clip_dir, folder, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "idx"
    run_embed(clip_dir, folder, out, tower="both", batch=3)
    assert main(["search", "--index", str(out), "--text", "a red cat", "--k", "3", "--backend", "torch", "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["rank"] for r in rows] == [0, 1, 2]
    q = reference_embeddings(clip_dir, captions=["a red cat"])["text"].numpy()
    index = EmbeddingIndex(str(out))
    stored = np.concatenate([index.shard_embeddings("image", i) for i in range(len(index.shards))])
    v, i = brute_force(q.astype(np.float32), stored.astype(np.float32), 3)
    meta_ids = [index.hit(0, 0, 0.0, int(j)).id for j in i[0]]
    assert [r["id"] for r in rows] == meta_ids
    np.testing.assert_allclose([r["score"] for r in rows], v[0], atol=1e-5)
    img = os.path.join(folder, "a.png")
    assert main(["search", "--index", str(out), "--image", img, "--k", "1", "--backend", "torch", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == "a.png"  # an indexed image finds itself
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("b.jpg\n")
    assert main(["search", "--index", str(out), "--ids", str(ids_file), "--k", "2"]) == 0
    text = capsys.readouterr().out
    assert "query 0: b.jpg" in text and "b.jpg" in text.splitlines()[1]


def test_parquet_index_searches_like_npy(clip_dir, folder, tmp_path):  # noqa: F811
    run_embed(clip_dir, folder, tmp_path / "npy", tower="image", batch=3)
    run_embed(clip_dir, folder, tmp_path / "pq", tower="image", batch=3, format="parquet")
    q = np.random.default_rng(3).standard_normal((2, 24)).astype(np.float32)
    a = search(str(tmp_path / "npy"), queries=q, k=4)
    b = search(str(tmp_path / "pq"), queries=q, k=4)
    assert [[h.to_dict() for h in x] for x in a] == [[h.to_dict() for h in x] for x in b]
    assert EmbeddingIndex(str(tmp_path / "pq")).manifest["dims"] == {"image": 24}

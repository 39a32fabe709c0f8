"""fastenc embed --ray on a local Ray cluster (2 CPUs): byte-identical output to the single-machine run, and a
resumed Ray run after a local partial run. One module-scoped ray.init (Ray's start costs seconds on 2 cores)."""

from __future__ import annotations

import os

import pytest

from fastenc.embed import EmbedConfig, embed
from tests.test_embed import clip_dir, private_cache, read_meta, tree_bytes, write_tars  # noqa: F401 - fixtures

ray = pytest.importorskip("ray", reason="Ray Data is an optional extra: pip install 'fastenc[ray]'")
pytest.importorskip("ray.data")
pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def config(model, src, out, **kw):
    kw = dict(tower="both", batch=2, shard_size=3, store="fp32", backend="torch", device="cpu", workers=0,
              progress=False) | kw  # fmt: skip
    return EmbedConfig(model=model, input=src, out=str(out), **kw)


def test_ray_output_identical_to_local_and_resumes(local_ray, clip_dir, tmp_path):  # noqa: F811
    """A local run, and a run whose shard 0 was done locally (the rest deleted, as if killed) finished on Ray with 2
    decode actors: byte-identical folders (embeddings, metadata, errors, manifest). The tars hold a corrupt image."""
    from fastenc.embed.ray_backend import embed_ray

    write_tars(tmp_path / "tars", n_tars=2, per_tar=4)
    src = str(tmp_path / "tars")
    local = tmp_path / "local"
    embed(config(clip_dir, src, local))
    part = tmp_path / "part"
    embed(config(clip_dir, src, part))
    for name in os.listdir(part):
        if not name.endswith("00000.npy") and name not in ("meta-00000.parquet", "run.json"):
            os.remove(part / name)
    report = embed_ray(config(clip_dir, src, part), decode_actors=2)
    assert report.shards_skipped == 1 and report.samples_run == 5 and report.rows == 7 and report.errors == 1
    assert tree_bytes(part) == tree_bytes(local)
    assert read_meta(part)["error"][5] is not None

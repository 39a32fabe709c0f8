"""`fastenc embed --ray [ADDRESS]`: the same pipeline on Ray Data, across a cluster.

    read (one row per model batch of the shard plan)
      -> map_batches(_Decode): CPU actors read, decode, preprocess and tokenize a whole model batch
      -> map_batches(_Embed):  an autoscaling actor pool, one GPU each (CPU actors without GPUs), running the
                               fastenc-optimized model at the fixed batch (CUDA graphs on CUDA)
      -> the driver assembles rows in plan order (preserve_order) and writes shards with the same ShardWriter

The rows are the single-machine run's batches (same shard plan, same padding, same SampleSource.prepare and
TowerRunner), so each batch's embeddings are computed from the same input by the same code at the same batch size:
the output folder is byte-identical to the local run's (tests/test_embed_ray.py) and resumes the same way.
`ray` is an optional extra: pip install 'fastenc[ray]'.
"""

from __future__ import annotations

import json
import time

import numpy as np

from ..core.errors import InputError
from .pipeline import (
    EmbedConfig,
    EmbedReport,
    ShardAssembler,
    TowerRunner,
    _progress,
    log_failures,
    prepare_run,
    to_host,
)


def _ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise InputError("--ray needs Ray Data: pip install 'fastenc[ray]'") from None
    return ray


class _Decode:
    """CPU actor: one plan row (a model batch) -> its prepared arrays (leading dim 1: one row per batch)."""

    def __init__(self, source):
        self.source = source

    def __call__(self, rows: dict) -> dict:
        out: dict[str, list] = {}
        for j in range(len(rows["batch"])):
            d = self.source.prepare(int(rows["start"][j]), int(rows["stop"][j]))
            d["errors"] = json.dumps(sorted(d["errors"].items()))
            for k in ("batch", "shard", "start", "stop"):
                d[k] = int(rows[k][j])
            for k, v in d.items():
                out.setdefault(k, []).append(v)
        return {k: np.stack(v) if isinstance(v[0], np.ndarray) else np.array(v) for k, v in out.items()}


class _Embed:
    """Model actor: prepared rows -> embeddings (float32, the whole padded batch)."""

    def __init__(self, model, towers, device, dtype, backend, cuda_graphs, preprocess):
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.runner = TowerRunner(
            model, towers, device=device, dtype=dtype, backend=backend, cuda_graphs=cuda_graphs, preprocess=preprocess
        )
        self.towers = towers

    def __call__(self, rows: dict) -> dict:
        import torch

        out = {k: rows[k] for k in ("batch", "shard", "start", "stop", "n", "index", "errors")}
        embs: dict[str, list] = {t: [] for t in self.towers}
        for j in range(len(rows["batch"])):
            batch = {k: torch.from_numpy(np.ascontiguousarray(rows[k][j]))
                     for k in ("pixel_values", "input_ids", "attention_mask") if k in rows}  # fmt: skip
            res = self.runner.run(batch)
            for t in self.towers:
                embs[t].append(to_host(res[t], res[t].shape[0]))
        return out | {f"emb_{t}": np.stack(v) for t, v in embs.items()}


def embed_ray(
    cfg: EmbedConfig, *, address: str | None = None, decode_actors: int | None = None, model_actors: int | None = None
) -> EmbedReport:
    """Run cfg on Ray Data (ray.init(address) unless Ray is already initialised); same output as embed(cfg)."""
    ray = _ray()
    t_start = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    use_gpu = gpus > 0 and cfg.device != "cpu"
    source, run, writer, shards, todo = prepare_run(cfg, use_gpu)
    source.ship_uint8 = use_gpu  # as the local run: uint8 to GPU actors, normalized by the decode actors otherwise
    model_actors = model_actors or (gpus if use_gpu else 1)
    decode_actors = decode_actors or max(1, cpus - (0 if use_gpu else model_actors))
    batches = [(s.index, a, b) for s in todo for a, b in s.batches()]
    report = EmbedReport(samples=len(source.table), shards=len(shards), shards_skipped=len(shards) - len(todo),
                         out=cfg.out, device=f"ray: {model_actors} model actor(s) on {'GPU' if use_gpu else 'CPU'}, "
                         f"{decode_actors} decode actor(s)")  # fmt: skip
    dims = None
    if batches:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # rows come back in plan order: shards assemble as locally
        rows = [{"batch": j, "shard": s, "start": a, "stop": b} for j, (s, a, b) in enumerate(batches)]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        pool = ray.data.ActorPoolStrategy  # autoscaling actor pools (min 1)
        ds = ds.map_batches(_Decode, fn_constructor_args=(source,), batch_size=1, batch_format="numpy",
                            num_cpus=1, compute=pool(min_size=1, max_size=decode_actors))  # fmt: skip
        ds = ds.map_batches(
            _Embed,
            fn_constructor_args=(
                cfg.model,
                source.towers,
                None if use_gpu else "cpu",
                cfg.dtype,
                cfg.backend,
                cfg.cuda_graphs,
                source.preprocess,
            ),  # fmt: skip
            batch_size=1,
            batch_format="numpy",
            num_gpus=1 if use_gpu else 0,
            num_cpus=0 if use_gpu else 1,
            compute=pool(min_size=1, max_size=model_actors),
        )
        bar = _progress(cfg, sum(b - a for _, a, b in batches))
        asm = None
        t_loop = time.perf_counter()
        for row in ds.iter_rows():
            if asm is None:
                dims = {t: int(row[f"emb_{t}"].shape[-1]) for t in source.towers}
                asm = ShardAssembler(writer, source.table, todo, source.towers, dims)
            n = int(row["n"])
            errors = {int(k): v for k, v in json.loads(row["errors"])}
            log_failures(report, source.table, errors, bar)
            refused = asm.add(int(row["shard"]), np.asarray(row["index"]), n, errors,
                              {t: np.asarray(row[f"emb_{t}"]) for t in source.towers})  # fmt: skip
            if refused:  # rows not finite in the stored dtype: failed samples, as in the local run
                log_failures(report, source.table, refused, bar)
            bar.update(int(row["stop"]) - int(row["start"]))
            report.samples_run += int(row["stop"]) - int(row["start"])
        bar.close()
        report.wall_s = time.perf_counter() - t_loop
    manifest = writer.finish(run, shards, source.table)
    report.rows, report.errors = manifest["rows"], manifest["errors"]
    report.warnings, report.input_cuts = manifest["warnings"], manifest["input_cuts"]
    report.extra["total_s"] = time.perf_counter() - t_start
    report.extra["dims"] = dims
    return report

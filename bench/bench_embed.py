"""Whole-pipeline throughput of `fastenc embed` against a plain transformers + DataLoader loop on the same images.

    python bench/bench_embed.py                                   # CPU: tiny CLIP, 512 synthetic JPEGs, the ratio
    python bench/bench_embed.py --shape ViT-L/14 --images 4096 --batch 256 --dtype fp16    # a GPU session

Rows (JSON lines, printed and appended to --out):
  model-only   the fastenc-optimized image tower (CUDA graphs on CUDA) on one preprocessed batch, repeated: the
               ceiling a pipeline can reach (samples/s)
  fastenc      `fastenc.embed.embed`: JPEG files -> worker decode / resize / normalise -> pinned -> model -> fp16
               shards on disk (samples/s over the loop, model busy share from CUDA events), and
               pipeline / model-only (the goal: >= 0.9 at ViT-L/14 b256); steady_*: from the first batch's
               arrival on (without worker start-up and the first decode)
  baseline     what users write today: a Dataset calling transformers' AutoImageProcessor per image, DataLoader
               (same workers, pinned), CLIPModel.get_image_features in the same dtype, embeddings kept in memory
               (no files written: favours the baseline)
  hf-model-only  the untouched transformers tower on the same batch (the baseline's ceiling)
  ray-N-decode-actors  (--ray-actors 1,2) the same run on a local Ray cluster with N decode actors
Synthetic images: smooth gradients plus noise at --px (default 320x240, web-image sized), saved as JPEG q90, random
weights (nothing is downloaded). clip-retrieval's published figure for ViT-L/14 is 312 samples/s per A100.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

CLIP_RETRIEVAL_A100 = 312.0  # samples/s, ViT-L/14, clip-retrieval's README


def make_images(folder: Path, n: int, px=(320, 240), seed=0) -> None:
    """n JPEGs, written by a process pool in chunks of 256 (the same files for any pool size)."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    chunks = [(folder, a, min(a + 256, n), px, seed) for a in range(0, n, 256)]
    with ProcessPoolExecutor(max_workers=max(1, min(len(chunks), (os.cpu_count() or 2) - 1))) as pool:
        list(pool.map(_make_chunk, chunks))


def _make_chunk(spec) -> None:
    import numpy as np
    from PIL import Image

    folder, a, b, px, seed = spec
    rng = np.random.default_rng([seed, a])
    w, h = px
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(a, b):
        c = rng.uniform(0, 255, size=(3, 3))
        img = np.stack([c[k, 0] + (c[k, 1] - c[k, 0]) * xx / w + (c[k, 2] - 128) * yy / h for k in range(3)], -1)
        img = np.clip(img + rng.normal(0, 12, size=img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:07d}.jpg", quality=90)


def make_checkpoint(folder: Path, shape: str, layers: int | None) -> None:
    import torch
    import transformers
    from transformers import CLIPModel

    from fastenc.models.configs import CLIP_SHAPES, clip_config

    torch.manual_seed(0)
    CLIPModel(clip_config(shape, layers=layers)).save_pretrained(folder)
    s = CLIP_SHAPES[shape].image_size
    proc = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    proc(size={"shortest_edge": s}, crop_size={"height": s, "width": s}).save_pretrained(folder)


def model_only(fn, x, device, iters: int) -> float:
    """samples/s of fn(x) at a fixed batch after 3 warm-up calls (captures CUDA graphs): Timer.back_to_back."""
    import torch

    from fastenc.benchmark.timing import Timer

    timer = Timer(device, flush_l2=False)
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        ms = timer.back_to_back(lambda: fn(x), iters)
    return x.shape[0] / (ms * 1e-3)


class _HFDataset:
    def __init__(self, files, model_dir):
        self.files, self.model_dir, self.proc = files, model_dir, None

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        from transformers import AutoImageProcessor

        if self.proc is None:
            self.proc = AutoImageProcessor.from_pretrained(self.model_dir)
        img = Image.open(self.files[i]).convert("RGB")
        return self.proc(images=img, return_tensors="pt")["pixel_values"][0]


def _features(out):
    return getattr(out, "pooler_output", out)  # a ModelOutput in newer transformers, a tensor in older


def baseline(model_dir, files, batch, workers, device, dtype) -> dict:
    import torch
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(model_dir).to(device=device, dtype=dtype).eval()
    loader = torch.utils.data.DataLoader(
        _HFDataset(files, model_dir),
        batch_size=batch,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    out = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for px in loader:
            out.append(_features(model.get_image_features(pixel_values=px.to(device, dtype, non_blocking=True))))
            out[-1] = out[-1].float().cpu()
    wall = time.perf_counter() - t0
    return {"samples": len(files), "wall_s": wall, "samples_per_s": len(files) / wall}


def run(args, sink=None) -> list[dict]:
    """Every row of one configuration; sink(row) gets each row as it exists (default: print a JSON line)."""
    import torch

    import fastenc
    from fastenc._cli_common import DTYPES, parse_device
    from fastenc.embed import EmbedConfig, embed
    from fastenc.embed.pipeline import TowerRunner
    from fastenc.embed.reader import ImagePreprocessor, decode_image

    device = parse_device(args.device)
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = getattr(torch, DTYPES[dtype_name])
    workers = args.workers if args.workers is not None else max(1, min(16, (os.cpu_count() or 2) - 1))
    work = Path(args.work or tempfile.mkdtemp(prefix="fastenc-bench-embed-"))
    model_dir, img_dir = work / "model", work / f"images-{args.images}-{args.px[0]}x{args.px[1]}"
    if not (model_dir / "config.json").exists():
        make_checkpoint(model_dir, args.shape, args.layers)
    if not img_dir.exists():
        t0 = time.perf_counter()
        make_images(img_dir, args.images, tuple(args.px))
        print(f"# {args.images} JPEGs written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    files = sorted(str(p) for p in img_dir.iterdir())
    common = dict(shape=args.shape, layers=args.layers, batch=args.batch, dtype=dtype_name, device=str(device),
                  workers=workers, images=args.images, px=list(args.px), backend=args.backend,
                  torch=torch.__version__, fastenc=fastenc.__version__,
                  gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)  # fmt: skip
    rows = []

    from fastenc.benchmark.env import git_commit
    from fastenc.benchmark.rows import make_row

    commit = git_commit() if sink is None else None  # a sink's rows take the caller's commit (the GPU session's)

    def emit(provider: str, **fields):
        row = make_row(
            "bench_embed",
            "clip-image-embed",
            provider,
            mode="throughput",
            config={k: common[k] for k in ("shape", "layers", "batch", "workers", "images", "px", "backend")},
            dtype=dtype_name,
            device=str(device),
            versions={"torch": torch.__version__, "fastenc": fastenc.__version__},
            commit=commit,
            provider=provider,
            **fields,
            **{k: v for k, v in common.items() if k not in ("dtype", "device")},
        )
        if sink is not None:
            del row["commit"]
        rows.append(row)
        if sink is not None:
            sink(row)
        else:
            print(json.dumps(row))
            sys.stdout.flush()

    # model-only: the fastenc tower on one real preprocessed batch (repeated to the batch size)
    runner = TowerRunner(str(model_dir), ("image",), device=str(device), dtype=dtype_name, backend=args.backend,
                         cuda_graphs=not args.no_cuda_graphs)  # fmt: skip
    pre = ImagePreprocessor.from_checkpoint(str(model_dir), runner.config)
    import numpy as np

    px = np.stack([pre(decode_image(("file", f))) for f in files[: min(args.batch, len(files))]])
    px = torch.from_numpy(np.resize(px, (args.batch, *px.shape[1:]))).to(device)
    fast_model = model_only(lambda x: runner.run({"pixel_values": x}), px, device, args.iters)
    emit(provider="model-only", samples_per_s=fast_model, vs_clip_retrieval_a100=fast_model / CLIP_RETRIEVAL_A100)
    runner = None  # free the model before the pipeline loads its own

    out = work / "out"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cfg = EmbedConfig(model=str(model_dir), input=str(img_dir), out=str(out), tower="image", batch=args.batch,
                      shard_size=max(args.batch, args.images // 4), dtype=dtype_name, backend=args.backend,
                      device=str(device), workers=workers, cuda_graphs=not args.no_cuda_graphs,
                      progress=False)  # fmt: skip
    rep = embed(cfg)
    steady = rep.extra.get("steady_samples_per_s")
    emit(provider="fastenc", samples_per_s=rep.samples_per_s, wall_s=rep.wall_s, model_s=rep.model_s,
         model_busy=rep.model_s / rep.wall_s if rep.wall_s else None,
         pipeline_over_model_only=rep.samples_per_s / fast_model, errors=rep.errors,
         steady_samples_per_s=steady, steady_over_model_only=steady / fast_model if steady else None,
         vs_clip_retrieval_a100=rep.samples_per_s / CLIP_RETRIEVAL_A100)  # fmt: skip

    if not args.no_baseline:
        from transformers import CLIPModel

        hf = CLIPModel.from_pretrained(str(model_dir)).to(device=device, dtype=dtype).eval()
        hf_model = model_only(
            lambda x: _features(hf.get_image_features(pixel_values=x.to(dtype))), px, device, args.iters
        )
        emit(provider="hf-model-only", samples_per_s=hf_model)
        del hf
        b = baseline(str(model_dir), files, args.batch, workers, device, dtype)
        emit(provider="baseline", **b, fastenc_over_baseline=rep.samples_per_s / b["samples_per_s"])
    if args.ray_actors:
        import ray

        from fastenc.embed.ray_backend import embed_ray

        counts = [int(x) for x in args.ray_actors.split(",")]
        if not ray.is_initialized():
            ray.init(num_cpus=max(counts) + 1, include_dashboard=False, log_to_driver=False)
        for n in counts:
            ray_out = work / f"out-ray-{n}"
            if ray_out.exists():
                import shutil

                shutil.rmtree(ray_out)
            cfg.out = str(ray_out)
            r = embed_ray(cfg, decode_actors=n)
            emit(provider=f"ray-{n}-decode-actors", samples_per_s=r.samples_per_s, wall_s=r.wall_s,
                 total_s=r.extra["total_s"], errors=r.errors)  # fmt: skip
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny", help="CLIP shape of fastenc.models.configs (default tiny)")
    p.add_argument("--layers", type=int, default=None, help="reduce both towers to N layers")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--px", type=int, nargs=2, default=(320, 240), metavar=("W", "H"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"])
    p.add_argument("--device", default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument("--workers", type=int, default=None, help="loader processes (default min(16, cpus - 1))")
    p.add_argument("--iters", type=int, default=10, help="model-only repetitions")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--ray-actors", default=None, help="also run on a local Ray cluster with these decode actor counts")
    p.add_argument("--work", default=None, help="folder for the checkpoint, images and output (default: a temp dir)")
    p.add_argument("--out", default=None, help="append the rows to this JSONL file")
    return p


def main(argv=None) -> int:
    run(parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

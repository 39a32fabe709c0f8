"""First CLIP tower timing: transformers eager vs transformers SDPA vs fastenc (Triton), one process, one run.

    python bench/bench_clip.py --shape ViT-L/14 --dtype fp16 --batch 1 8 64 --out bench/results/clip_first.json

Random weights from a named config (no downloads). Per row: p50/p90 latency over --iters timed calls (CUDA events,
after --warmup calls), throughput, peak memory, and the speedup of fastenc over each competitor from the same run.
Needs a CUDA device; the full side-by-side harness (compile, ONNX, CUDA graphs, MFU, plots) is bench_models.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import EXIT_NO_CUDA, add_speedups, append_rows, model_meta, model_row, no_cuda, time_model

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="ViT-L/14")
    p.add_argument("--tower", choices=["text", "vision"], nargs="+", default=["text", "vision"])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", type=Path, default=None, help="append rows to this JSON file")
    args = p.parse_args(argv)

    if no_cuda("bench_clip.py: no CUDA device here; this benchmark only runs on a GPU"):
        return EXIT_NO_CUDA
    import torch
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    import fastenc
    from fastenc.models.configs import clip_config
    from fastenc.parity import clip_inputs

    dtype = getattr(torch, DTYPES[args.dtype])
    cfg = clip_config(args.shape)
    rows = []
    meta = model_meta()
    for tower in args.tower:
        cls, sub = (
            (CLIPTextModelWithProjection, cfg.text_config)
            if tower == "text"
            else (CLIPVisionModelWithProjection, cfg.vision_config)
        )
        models = {}
        for impl in ("eager", "sdpa"):
            torch.manual_seed(0)
            models[f"transformers-{impl}"] = cls._from_config(sub, attn_implementation=impl).to("cuda", dtype).eval()
        models["fastenc-triton"] = fastenc.optimize(models["transformers-sdpa"], backend="triton", strict=True)
        for batch in args.batch:
            inputs = clip_inputs(cfg, batch, device="cuda", dtype=dtype)
            inputs = {k: v for k, v in inputs.items() if (k == "pixel_values") == (tower == "vision")}
            results = {}
            for name, model in models.items():
                r = time_model(model, inputs, args.warmup, args.iters)
                results[name] = {**r, "items_per_s": batch / (r["p50_ms"] / 1e3)}
            add_speedups(results, "fastenc-triton")
            for name, r in results.items():
                print(
                    f"{args.shape:>12} {tower:>6} {args.dtype} b={batch:<4} {name:<22} p50 {r['p50_ms']:8.3f} ms  "
                    f"p90 {r['p90_ms']:8.3f} ms  {r['items_per_s']:10.1f}/s  peak {r['peak_mem_mb']:8.1f} MB  "
                    f"fastenc x{r['fastenc_speedup']:.2f}"
                )
                rows.append(
                    model_row(
                        "bench_clip",
                        meta,
                        f"clip-{tower}",
                        name,
                        r.pop("samples_ms"),
                        mode="forward",
                        config={"shape": args.shape, "tower": tower, "batch": batch},
                        dtype=args.dtype,
                        shape=args.shape,
                        tower=tower,
                        batch=batch,
                        **r,
                    )
                )
    if args.out:
        append_rows(args.out, rows, newline=False)
        print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

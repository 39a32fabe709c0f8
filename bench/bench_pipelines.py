"""encode_prompt of tiny SD 1.x / SDXL / SD3 / FLUX pipelines (random weights, built locally, nothing downloaded):
eager vs fastenc (+ CUDA graphs on CUDA) vs a PromptCache hit, plus the cache's fingerprint cost; one row per
(pipeline, competitor, batch) appended to --out (default bench/results/pipelines_<device>.jsonl).

    python bench/bench_pipelines.py [--families sd,sdxl,sd3,flux] [--batch 1,4] [--device cpu] [--iters 10]

For real checkpoints use `fastenc bench --pipeline DIR`, which runs the same measurement on a saved pipeline.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.pipeline_utils builds the tiny pipelines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="sd,sdxl,sd3,flux")
    p.add_argument("--batch", default="1,4")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seq", type=int, default=77, help="T5 max_sequence_length (SD3 / FLUX)")
    p.add_argument("--width", type=int, default=32, help="text encoders' hidden size (CLIP and T5; 32: the test size)")
    p.add_argument("--layers", type=int, default=3, help="CLIP layers (T5: one fewer)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import torch

    from fastenc.benchmark.pipeline import bench_pipeline, table
    from fastenc.benchmark.rows import append_jsonl
    from tests.pipeline_utils import FAMILIES, build_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        p.error(f"unknown families {bad}; known: {','.join(FAMILIES)}")
    batches = [int(b) for b in args.batch.split(",")]
    out = args.out or REPO / "bench" / "results" / f"pipelines_{args.device.split(':')[0]}.jsonl"
    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for family in families:
            path = build_pipeline(family, tmp, width=args.width, layers=args.layers)
            rows += bench_pipeline(
                path,
                device=args.device,
                dtype=args.dtype,
                batches=batches,
                max_sequence_length=args.seq if family in ("sd3", "flux") else None,
                warmup=args.warmup,
                iters=args.iters,
                label=f"{family} text encoders width {args.width}, {args.layers} layers (tests/pipeline_utils.py)",
            )
    print(table(rows))
    append_jsonl(out, rows)
    print(f"# appended {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

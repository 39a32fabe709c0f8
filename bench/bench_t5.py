"""T5 encoder timing: transformers eager vs transformers SDPA vs fastenc (Triton), one process, one run.

    python bench/bench_t5.py --shape t5-v1_1-xxl --layers 4 --dtype bf16 fp16 --batch 1 8 --seq 128 512 \
        --out bench/results/t5_first.json

Random weights from the T5-v1.1 layer shapes below (no downloads), with --layers encoder blocks instead of the full
stack (every row carries "layers" and "full_layers": per-layer cost is what is compared; scale by full / layers for
a whole-model estimate). Per row: p50/p90 latency over --iters timed calls (CUDA events, after --warmup calls),
tokens/s, peak memory, the raw samples, the speedup of fastenc over each provider from the same run, and the max
abs difference of each provider's last_hidden_state from an fp32 transformers run of the same weights (NaN-aware:
non_finite counts inf/NaN elements, which transformers' fp16 T5 can produce). Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import EXIT_NO_CUDA, add_speedups, append_rows, model_meta, model_row, no_cuda, time_model

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# T5-v1.1 encoder layer shapes (google/t5-v1_1-*; Flan-T5 uses the same): gated-gelu, 32 buckets, max distance 128.
SHAPES = {
    "t5-v1_1-base": dict(d_model=768, d_kv=64, num_heads=12, d_ff=2048, num_layers=12),
    "t5-v1_1-large": dict(d_model=1024, d_kv=64, num_heads=16, d_ff=2816, num_layers=24),
    "t5-v1_1-xl": dict(d_model=2048, d_kv=64, num_heads=32, d_ff=5120, num_layers=24),
    "t5-v1_1-xxl": dict(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24),
}


def t5_config(shape: str, layers: int):
    from transformers import T5Config

    full = SHAPES[shape]
    return T5Config(
        vocab_size=32128,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        **{**full, "num_layers": layers},
    ), full["num_layers"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=["t5-v1_1-base", "t5-v1_1-xl"])
    p.add_argument("--layers", type=int, default=4, help="encoder blocks to build (reduced from the full count)")
    p.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["bf16", "fp16"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seq", type=int, nargs="+", default=[128, 512])
    p.add_argument("--pad", type=float, default=0.0, help="fraction of each row after the first padded out")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", type=Path, default=None, help="append rows to this JSON file")
    args = p.parse_args(argv)

    if no_cuda("bench_t5.py: no CUDA device here; this benchmark only runs on a GPU"):
        return EXIT_NO_CUDA
    import torch
    from transformers import T5EncoderModel

    import fastenc

    rows = []
    meta = model_meta()
    for shape in args.shape:
        cfg, full_layers = t5_config(shape, args.layers)
        torch.manual_seed(0)
        base32 = T5EncoderModel._from_config(cfg, attn_implementation="eager").eval()  # cpu, fp32 master weights
        for dname in args.dtype:
            dtype = getattr(torch, DTYPES[dname])
            models = {}
            for impl in ("eager", "sdpa"):
                m = T5EncoderModel._from_config(cfg, attn_implementation=impl).eval()
                m.load_state_dict(base32.state_dict())
                models[f"transformers-{impl}"] = m.to("cuda", dtype)
            models["fastenc-triton"] = fastenc.optimize(models["transformers-sdpa"], backend="triton", strict=True)
            ref32 = base32.to("cuda")
            for batch in args.batch:
                for seq in args.seq:
                    g = torch.Generator(device="cuda").manual_seed(batch * 7919 + seq)
                    ids = torch.randint(1, cfg.vocab_size, (batch, seq), device="cuda", generator=g)
                    mask = torch.ones(batch, seq, dtype=torch.long, device="cuda")
                    if args.pad > 0 and batch > 1:
                        mask[1:, max(1, int(seq * (1 - args.pad))) :] = 0
                    inputs = {"input_ids": ids, "attention_mask": mask}
                    with torch.inference_mode():
                        want = ref32(**inputs).last_hidden_state
                    results = {}
                    for name, model in models.items():
                        with torch.inference_mode():
                            got = model(**inputs).last_hidden_state.float()
                        finite = torch.isfinite(got)
                        diff = (got - want).abs()[finite]
                        r = time_model(model, inputs, args.warmup, args.iters)
                        results[name] = {
                            "p50_ms": r["p50_ms"],
                            "p90_ms": r["p90_ms"],
                            "tokens_per_s": batch * seq / (r["p50_ms"] / 1e3),
                            "peak_mem_mb": r["peak_mem_mb"],
                            "max_abs_err_vs_fp32": diff.max().item() if diff.numel() else float("nan"),
                            "non_finite": int((~finite).sum()),
                            "samples_ms": r["samples_ms"],
                        }
                    add_speedups(results, "fastenc-triton")
                    for name, r in results.items():
                        print(
                            f"{shape:>13} L={args.layers}/{full_layers} {dname} b={batch:<3} s={seq:<5} {name:<22} "
                            f"p50 {r['p50_ms']:8.3f} ms  p90 {r['p90_ms']:8.3f} ms  peak {r['peak_mem_mb']:8.1f} MB  "
                            f"err {r['max_abs_err_vs_fp32']:.2e} nonfinite {r['non_finite']}  "
                            f"fastenc x{r['fastenc_speedup']:.2f}"
                        )
                        rows.append(
                            model_row(
                                "bench_t5",
                                meta,
                                "t5-encoder",
                                name,
                                r.pop("samples_ms"),
                                mode="forward",
                                config={**SHAPES[shape], "num_layers": args.layers, "gated": True},
                                dtype=dname,
                                shape=shape,
                                layers=args.layers,
                                full_layers=full_layers,
                                batch=batch,
                                seq=seq,
                                pad=args.pad,
                                **r,
                            )
                        )
            del models
            base32 = base32.to("cpu")
            torch.cuda.empty_cache()
    if args.out:
        append_rows(args.out, rows, newline=False)
        print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

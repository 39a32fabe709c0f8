"""Small-batch latency of a CLIP text tower (77 tokens): fastenc CUDA graphs vs fastenc eager vs transformers
eager / SDPA vs torch.compile(mode="reduce-overhead"), one process, one run.

    python bench/bench_graphs.py --shape ViT-L/14 --dtype fp16 --batch 1 2 4 8 --out graphs_clip_text.json

Random weights from a named config (no downloads). At batch 1 the tower is bound by kernel-launch overhead, which is
what CUDA graphs remove. Per row: GPU time per call (CUDA events around each call, p50/p90) and wall time per call
(host clock around call + synchronize, p50/p90), raw samples of both, peak memory, the max abs difference of
text_embeds from transformers-sdpa (else the first provider) in the same dtype, and each provider's p50 over
fastenc-graphs' p50. A provider that fails (e.g. torch.compile of the fastenc model before its ops are
compile-friendly) gets a row with "error". A bare --out file name lands in bench/results/. Needs a CUDA device
(exit status 2 without one).
"""

from __future__ import annotations

import argparse
import sys
import traceback

from _common import EXIT_NO_CUDA, cuda_timer, model_meta, model_row, no_cuda, save_results

from fastenc.benchmark.rows import set_samples
from fastenc.benchmark.timing import percentile

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
PROVIDERS = (
    "transformers-eager",
    "transformers-sdpa",
    "compile-transformers",  # torch.compile(transformers SDPA model, mode="reduce-overhead"): CUDA graph trees
    "fastenc",
    "fastenc-graphs",
    "compile-fastenc",  # torch.compile(fastenc model, mode="reduce-overhead")
)


def build(provider: str, cls, sub, dtype, backend: str):
    import torch

    import fastenc

    torch.manual_seed(0)  # every provider gets the same random weights
    impl = "eager" if provider == "transformers-eager" else "sdpa"
    model = cls._from_config(sub, attn_implementation=impl).to("cuda", dtype).eval()
    if provider == "compile-transformers":
        return torch.compile(model, mode="reduce-overhead")
    if provider == "fastenc":
        return fastenc.optimize(model, backend=backend)
    if provider == "fastenc-graphs":
        return fastenc.optimize(model, backend=backend, cuda_graphs=True)
    if provider == "compile-fastenc":
        return torch.compile(fastenc.optimize(model, backend=backend), mode="reduce-overhead")
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="ViT-L/14")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seq", type=int, default=77, help="tokens per prompt (CLIP tokenizers pad to 77)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list from {PROVIDERS}")
    p.add_argument("--backend", default="auto", help="fastenc backend of the fastenc providers")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls (compile and graph capture happen here)")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--out", default=None, help="append rows to this JSON file (a bare name: under bench/results/)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.providers.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PROVIDERS))
    if unknown:
        p.error(f"unknown providers {unknown}; choose from {PROVIDERS}")

    if no_cuda("bench_graphs.py: no CUDA device here; this benchmark only runs on a GPU"):
        return EXIT_NO_CUDA
    import torch
    from transformers import CLIPTextModelWithProjection

    from fastenc.models.configs import clip_config
    from fastenc.parity import clip_inputs

    dtype = getattr(torch, DTYPES[args.dtype])
    cfg = clip_config(args.shape)
    meta = model_meta()
    rows = []
    for batch in args.batch:
        inputs = clip_inputs(cfg, batch, device="cuda", dtype=dtype, seq=args.seq)
        inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
        results = {}
        for name in names:
            row = model_row(
                "bench_graphs",
                meta,
                "clip-text",
                name,
                mode="forward",
                config={"shape": args.shape, "tower": "text", "batch": batch, "seq": args.seq},
                dtype=args.dtype,
                shape=args.shape,
                tower="text",
                batch=batch,
                seq=args.seq,
                backend=args.backend if name.endswith(("fastenc", "graphs")) else None,
            )
            model = None
            try:
                model = build(name, CLIPTextModelWithProjection, cfg.text_config, dtype, args.backend)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                with torch.inference_mode():
                    gpu = cuda_timer(flush_l2=False).warm_samples(
                        lambda m=model, x=inputs: m(**x), args.warmup, args.iters
                    )
                    wall = cuda_timer(flush_l2=False, host=True).warm_samples(
                        lambda m=model, x=inputs: m(**x), 2, args.iters
                    )
                    embeds = model(**inputs).text_embeds.float().clone()
                set_samples(row, gpu)
                row.update(
                    p90_ms=percentile(gpu, 90),
                    wall_p50_ms=percentile(wall, 50),
                    wall_p90_ms=percentile(wall, 90),
                    peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20,
                    wall_samples_ms=wall,
                    embeds=embeds,
                )
                results[name] = row
            except Exception as e:  # a provider that cannot run here still leaves a row saying why
                row["error"] = row["notes"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            finally:
                model = None
                torch.cuda.empty_cache()
            rows.append(row)
        base = results.get("fastenc-graphs")
        ref = results.get("transformers-sdpa") or next(iter(results.values()), None)
        reference = ref["embeds"] if ref else None
        for r in results.values():
            r["max_abs_diff_vs_sdpa"] = (r["embeds"] - reference).abs().max().item()
            if base is not None:
                r["p50_over_graphs"] = r["p50_ms"] / base["p50_ms"]
                r["wall_p50_over_graphs"] = r["wall_p50_ms"] / base["wall_p50_ms"]
        for r in results.values():
            del r["embeds"]
        for r in rows[-len(names) :]:
            if "error" in r:
                print(f"{args.shape:>10} {args.dtype} b={batch:<3} {r['provider']:<22} ERROR {r['error'][:90]}")
                continue
            print(
                f"{args.shape:>10} {args.dtype} b={batch:<3} {r['provider']:<22} gpu p50 {r['p50_ms']:8.3f} ms  "
                f"wall p50 {r['wall_p50_ms']:8.3f} ms  peak {r['peak_mem_mb']:8.1f} MB  "
                f"diff {r['max_abs_diff_vs_sdpa']:.2e}"
                + (f"  x{r['wall_p50_over_graphs']:.2f} of graphs" if "wall_p50_over_graphs" in r else "")
            )
    if args.out:
        save_results(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

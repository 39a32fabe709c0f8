"""Time fastenc's Triton attention against torch SDPA and the plain-torch reference on CUDA.

    python bench/bench_attention.py                                   # CLIP/T5-style shapes, fp16
    python bench/bench_attention.py --dtype bf16 --causal --mask      # CLIP text: causal + padding
    python bench/bench_attention.py --shape 4,12,512,64 --bias --out t5.json

Shapes are B,H,S,D. Inputs are views of one packed (B, S, 3, H, D) projection output, as the fused towers pass
them. Times are triton.testing.do_bench quantiles (p20/p50/p80, ms); TFLOP/s = flops() / p50. With --out, rows
(provider, shape, config, timings, gpu, versions, git commit) are appended to a JSON list under bench/results/.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _common import (
    EXIT_NO_CUDA,
    bench_provider,
    kernel_env,
    no_cuda,
    parse_providers,
    print_kernel_env,
    save_results,
    shape_parser,
)

DEFAULT_SHAPES = [(64, 12, 77, 64), (32, 16, 257, 64), (8, 16, 577, 64)]  # CLIP text B/32, ViT-L/14, ViT-L/14-336
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PROVIDERS = ("fastenc", "kernel", "cuda", "cuda_kernel", "sdpa", "reference")


def flops(b: int, h: int, sq: int, sk: int, d: int, causal: bool) -> float:
    """Forward FLOPs of attention: two matmuls (q @ k^T and p @ v), 2 * Sq * Sk * D each, per (b, h).

    Causal counts the kept (i, j) pairs only: Sq * (Sq + 1) / 2 of Sq * Sk (Sq == Sk)."""
    pairs = sq * (sq + 1) / 2 if causal else sq * sk
    return 4.0 * b * h * pairs * d


def make_inputs(b, h, s, d, dtype, *, mask: bool, bias: bool, device="cuda"):
    qkv = torch.randn(b, s, 3, h, d, dtype=dtype, device=device)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, S, D), views
    kpm = None
    if mask:  # right padding: batch row i keeps its first len_i keys, len_i in [1, S]
        lens = torch.randint(1, s + 1, (b,), device=device)
        kpm = torch.arange(s, device=device)[None, :] < lens[:, None]  # (B, S) bool
    bias_t = torch.randn(1, h, s, s, dtype=dtype, device=device) if bias else None  # T5-style position bias
    return q, k, v, kpm, bias_t


def sdpa_mask(q, kpm, bias, causal):
    """(SDPA's additive float attn_mask or None, is_causal): padding, bias and causal folded into one mask, since
    SDPA takes one; with no mask, causal stays SDPA's is_causal flag."""
    if kpm is None and bias is None:
        return None, causal
    mask = torch.zeros(1, 1, 1, 1, dtype=q.dtype, device=q.device)
    if kpm is not None:
        mask = mask.masked_fill(~kpm[:, None, None, :], float("-inf"))
    if bias is not None:
        mask = mask + bias
    if causal:
        s = q.shape[2]
        tri = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        mask = mask.masked_fill(~tri, float("-inf"))
    return mask, False


def providers(q, k, v, kpm, bias, causal):
    import fastenc
    from fastenc.core import cuda as _cuda
    from fastenc.kernels.attention import attention_forward
    from fastenc.ops.attention import attention_reference

    scale = q.shape[-1] ** -0.5
    attn_mask, sdpa_causal = sdpa_mask(q, kpm, bias, causal)
    return {
        "fastenc": lambda: fastenc.ops.attention(
            q, k, v, causal=causal, key_padding_mask=kpm, bias=bias, backend="triton", strict=True
        ),
        "kernel": lambda: attention_forward(q, k, v, causal=causal, key_padding_mask=kpm, bias=bias, scale=scale),
        # the csrc/ short-sequence kernel (Sk <= 128, fp16/bf16, no bias): the op strict, and its launcher
        "cuda": lambda: fastenc.ops.attention(
            q, k, v, causal=causal, key_padding_mask=kpm, bias=bias, backend="cuda", strict=True
        ),
        "cuda_kernel": lambda: _cuda.attention_forward(
            q, k, v, causal=causal, key_padding_mask=kpm, bias=bias, scale=scale
        ),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=sdpa_causal, scale=scale
        ),
        "reference": lambda: attention_reference(q, k, v, kpm, bias, causal=causal, scale=scale),
    }


def chosen_config() -> dict | None:
    """The autotuner's pick for the last launch (None before any launch)."""
    from fastenc.kernels.attention import _autotuned_kernel

    best = getattr(_autotuned_kernel(), "best_config", None)
    if best is None:
        return None
    return {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}


parse_shape = shape_parser("B,H,S,D")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=parse_shape, action="append", help="B,H,S,D (repeatable); default: CLIP shapes")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--mask", action="store_true", help="random right-padding key_padding_mask")
    p.add_argument("--bias", action="store_true", help="(1, H, S, S) additive bias, as T5")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list from {PROVIDERS}")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--out", help="JSON file to append rows to (a bare name goes under bench/results/)")
    args = p.parse_args(argv)

    if no_cuda("bench_attention: no CUDA device found; this benchmark times GPU kernels and needs one."):
        return EXIT_NO_CUDA

    names = parse_providers(p, args.providers, PROVIDERS)
    dtype = DTYPES[args.dtype]
    shapes = args.shape or DEFAULT_SHAPES
    env = kernel_env()
    print_kernel_env(env)
    print(f"# dtype {args.dtype}  causal {args.causal}  mask {args.mask}  bias {args.bias}")
    print(f"{'B,H,S,D':>16} {'provider':>10} {'p50 ms':>9} {'p20 ms':>9} {'p80 ms':>9} {'TFLOP/s':>8} {'max err':>9}")

    rows = []
    torch.manual_seed(0)
    for b, h, s, d in shapes:
        q, k, v, kpm, bias = make_inputs(b, h, s, d, dtype, mask=args.mask, bias=args.bias)
        fns = providers(q, k, v, kpm, bias, args.causal)
        ref = fns["reference"]().float()
        fl = flops(b, h, s, s, d, args.causal)
        for name in names:
            fn = fns[name]
            got = bench_provider(  # the cuda providers refuse Sk > 128, bias, fp32: a row saying why
                fn,
                lambda y, ref=ref: (y.float() - ref).abs().nan_to_num(0.0).max().item(),
                args.warmup,
                args.rep,
                f"{f'{b},{h},{s},{d}':>16} {name:>10}",
            )
            if isinstance(got, str):
                shape = {"B": b, "H": h, "S": s, "D": d}
                rows.append({"op": "attention", "provider": name, "shape": shape, "error": got, **env})
                continue
            err, p20, p50, p80 = got
            tflops = fl / (p50 * 1e-3) / 1e12
            print(f"{f'{b},{h},{s},{d}':>16} {name:>10} {p50:9.4f} {p20:9.4f} {p80:9.4f} {tflops:8.2f} {err:9.2e}")
            rows.append(
                {
                    "op": "attention",
                    "provider": name,
                    "mode": "forward",
                    "shape": {"B": b, "H": h, "S": s, "D": d},
                    "dtype": args.dtype,
                    "causal": args.causal,
                    "mask": args.mask,
                    "bias": args.bias,
                    "config": chosen_config() if name in ("fastenc", "kernel") else None,
                    "ms": {"p20": p20, "p50": p50, "p80": p80},
                    "flops": fl,
                    "tflops_p50": tflops,
                    "max_abs_err_vs_reference": err,
                    "do_bench": {"warmup_ms": args.warmup, "rep_ms": args.rep},
                    **env,
                }
            )

    if args.out:
        save_results(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time forward + backward of fastenc's tiled CLIP / SigLIP losses against the plain-torch formula on CUDA.

    python bench/bench_contrastive.py                                  # N = 4k..64k, d = 512 and 1024, fp16, CLIP
    python bench/bench_contrastive.py --loss siglip --dtype bf16 --n 16384 --d 768 --out contrastive.json

Providers: "fastenc" (fastenc.ops.*_loss, backend="triton"), "torch-tiled" (the same op, backend="torch": the tiled
torch path) and "reference" (open_clip / big_vision: full N x N logits, then cross-entropy / logsigmoid; an OOM is
caught and recorded). Each sample is one forward + backward w.r.t. both feature matrices and the scale (and bias),
timed with CUDA events after warm-up; peak memory is torch.cuda.max_memory_allocated over one call, minus the
inputs. FLOPs: forward 2 N^2 d, backward 4 matmuls (recompute + grad, twice) = 8 N^2 d for fastenc; reported as the
minimal 6 N^2 d (fwd + 2 grad matmuls) for every provider so TFLOP/s compare like for like. With --out, rows
(device, versions, commit, config, raw samples) are appended to a JSON list under bench/results/.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _common import (
    EXIT_NO_CUDA,
    cuda_timer,
    kernel_env,
    kernel_row,
    no_cuda,
    parse_providers,
    print_kernel_env,
    save_results,
)

from fastenc.benchmark.rows import set_samples

DEFAULT_N = [4096, 8192, 16384, 32768, 65536]
DEFAULT_D = [512, 1024]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PROVIDERS = ("fastenc", "torch-tiled", "reference")


def flops(n: int, d: int) -> float:
    """Minimal forward + backward FLOPs: s I T^T (2 N^2 d), dI = G T and dT = G^T I (2 N^2 d each)."""
    return 6.0 * n * n * d


def make_step(provider: str, loss: str, n: int, d: int, dtype: torch.dtype, device="cuda"):
    """A closure running one forward + backward; inputs allocated here (unit features, scale 100, bias -10)."""
    import fastenc
    from fastenc.ops.contrastive import clip_loss_reference, siglip_loss_reference

    i = torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=-1).to(dtype).requires_grad_()
    t = torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=-1).to(dtype).requires_grad_()
    s = torch.tensor(100.0, device=device, requires_grad=True)
    b = torch.tensor(-10.0, device=device, requires_grad=True)
    wrt = (i, t, s) if loss == "clip" else (i, t, s, b)

    def forward():
        if provider == "reference":  # logits in the feature dtype, as open_clip under autocast
            logits = s.to(dtype) * i @ t.T
            if loss == "clip":
                labels = torch.arange(n, device=device)
                return (
                    torch.nn.functional.cross_entropy(logits, labels)
                    + torch.nn.functional.cross_entropy(logits.T, labels)
                ) / 2
            labels = 2 * torch.eye(n, device=device, dtype=dtype) - 1
            return -torch.nn.functional.logsigmoid(labels * (logits + b.to(dtype))).sum() / n
        backend = "triton" if provider == "fastenc" else "torch"
        if loss == "clip":
            return fastenc.ops.clip_loss(i, t, s, backend=backend, strict=True)
        return fastenc.ops.siglip_loss(i, t, s, b, backend=backend, strict=True)

    def step():
        return torch.autograd.grad(forward(), wrt)

    def reference_value():
        with torch.no_grad():
            i32, t32 = i.float(), t.float()
            if loss == "clip":
                return clip_loss_reference(i32, t32, s).item() if n <= 16384 else None
            return siglip_loss_reference(i32, t32, s, b).item() if n <= 16384 else None

    return step, forward, reference_value


def measure(step, iters: int, warmup: int) -> tuple[list[float], int]:
    """(per-iteration ms samples, peak extra bytes over one call)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return cuda_timer(flush_l2=False).samples(step, iters), peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", choices=["clip", "siglip"], default="clip")
    p.add_argument("--n", type=int, action="append", help=f"global batch (repeatable); default {DEFAULT_N}")
    p.add_argument("--d", type=int, action="append", help=f"feature dim (repeatable); default {DEFAULT_D}")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list from {PROVIDERS}")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", help="JSON file to append rows to (a bare name goes under bench/results/)")
    args = p.parse_args(argv)

    if no_cuda("bench_contrastive: no CUDA device found; this benchmark times GPU kernels and needs one."):
        return EXIT_NO_CUDA
    names = parse_providers(p, args.providers, PROVIDERS)
    dtype = DTYPES[args.dtype]
    env = kernel_env()
    print_kernel_env(env)
    print(f"# loss {args.loss}  dtype {args.dtype}  fwd+bwd")
    print(f"{'N':>7} {'d':>5} {'provider':>12} {'p50 ms':>9} {'peak MiB':>9} {'TFLOP/s':>8} {'loss':>10}")

    rows = []
    torch.manual_seed(0)
    for n in args.n or DEFAULT_N:
        for d in args.d or DEFAULT_D:
            for name in names:
                row = kernel_row(
                    "bench_contrastive",
                    env,
                    f"{args.loss}_loss",
                    name,
                    mode="forward+backward",
                    config={"N": n, "d": d, "dtype": args.dtype, "iters": args.iters, "warmup": args.warmup},
                    dtype=args.dtype,
                )
                try:
                    step, forward, reference_value = make_step(name, args.loss, n, d, dtype)
                    value = forward().item()
                    samples, peak = measure(step, args.iters, args.warmup)
                    set_samples(row, samples)
                    p50 = row["p50_ms"]
                    row.update(
                        ms_samples=samples,
                        ms_p50=p50,
                        peak_bytes=peak,
                        tflops_p50=flops(n, d) / (p50 * 1e-3) / 1e12,
                        loss=value,
                        loss_fp32_reference=reference_value(),
                        status="ok",
                    )
                    tf = row["tflops_p50"]
                    print(f"{n:>7} {d:>5} {name:>12} {p50:9.3f} {peak / 2**20:9.1f} {tf:8.2f} {value:10.5f}")
                except torch.cuda.OutOfMemoryError as e:
                    row.update(status="oom", error=str(e).splitlines()[0], notes="out of memory")
                    print(f"{n:>7} {d:>5} {name:>12} {'OOM':>9}")
                finally:
                    step = forward = reference_value = None
                    torch.cuda.empty_cache()
                rows.append(row)

    if args.out:
        save_results(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

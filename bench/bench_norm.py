"""Time fastenc's Triton LayerNorm / RMSNorm (optionally with the fused residual add) against torch on CUDA.

    python bench/bench_norm.py                                         # layer_norm + rms_norm, encoder shapes, fp16
    python bench/bench_norm.py --op rms_norm --residual --dtype bf16   # T5 block: x + residual, then T5LayerNorm
    python bench/bench_norm.py --shape 16384,1024 --providers kernel,torch --out norm.json
    python bench/bench_norm.py --backward --residual                   # training: dx, dresidual, dweight, dbias

Shapes are ROWS,N with ROWS = batch * sequence. Providers: fastenc (the op, backend="triton"), kernel (the launcher
alone), torch (eager as transformers runs it: nn.LayerNorm in the input dtype / the T5LayerNorm formula, residual
added first), compile (torch.compile of the torch provider). Times are triton.testing.do_bench quantiles
(p20/p50/p80, ms); GB/s = bytes() / p50, counting only the compulsory traffic, so it is comparable across providers.
With --out, rows (provider, shape, config, timings, gpu, versions, git commit) are appended to a JSON list under
bench/results/.

--backward times the gradient of a forward taken once (retain_graph): fastenc / cuda (autograd through the op: the
fused Triton backward), kernel (layer_norm_backward / rms_norm_backward alone), reference (torch.func.vjp of the
reference formula: the op's backward before the fused kernels), torch (eager autograd of the formula as transformers
runs it). compile and cuda_kernel are forward-only. Bytes: read dy, s (+ ds), write dx (+ dresidual).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from _common import (
    EXIT_NO_CUDA,
    bench_provider,
    first,
    kernel_env,
    kernel_error_row,
    kernel_row,
    lazy_provider,
    no_cuda,
    parse_providers,
    print_kernel_env,
    save_results,
    shape_parser,
)

from fastenc.benchmark.timing import percentile

# ROWS, N: CLIP text B/32 (64 x 77, 768), ViT-L/14 (32 x 257, 1024), ViT-H/14 (16 x 257, 1280),
# T5-large (32 x 512, 1024), T5-XXL (8 x 512, 4096).
DEFAULT_SHAPES = [(4928, 768), (8224, 1024), (4112, 1280), (16384, 1024), (4096, 4096)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
OPS = ("layer_norm", "rms_norm")
PROVIDERS = ("fastenc", "kernel", "cuda", "cuda_kernel", "torch", "compile")


def bytes_moved(op: str, rows: int, n: int, dtype: torch.dtype, weight_dtype: torch.dtype, residual: bool) -> int:
    """Compulsory HBM traffic: read x (+ residual), write y (+ residual_out), read weight (+ bias for layer_norm).

    y is in x.dtype except for rms_norm with a half weight, where it takes the weight's dtype (same size here)."""
    elt = torch.empty((), dtype=dtype).element_size()
    w_elt = torch.empty((), dtype=weight_dtype).element_size()
    activations = rows * n * elt * (2 + 2 * int(residual))
    params = n * w_elt * (2 if op == "layer_norm" else 1)
    return activations + params


def make_inputs(rows, n, dtype, weight_dtype, residual):
    x = torch.randn(rows, n, dtype=dtype, device="cuda")
    r = torch.randn(rows, n, dtype=dtype, device="cuda") if residual else None
    w = (1.0 + 0.1 * torch.randn(n, device="cuda")).to(weight_dtype)
    b = (0.1 * torch.randn(n, device="cuda")).to(weight_dtype)
    return x, r, w, b


def providers(op, x, r, w, b, eps):
    import fastenc
    from fastenc.core import cuda as _cuda
    from fastenc.kernels import norm as kernels
    from fastenc.ops.reference import rms_norm_reference

    n = x.shape[-1]
    if op == "layer_norm":
        w_eager, b_eager = w.to(x.dtype), b.to(x.dtype)  # nn.LayerNorm holds its parameters in the model dtype

        def eager(x, r):
            s = x if r is None else x + r
            return F.layer_norm(s, (n,), w_eager, b_eager, eps), s

        fastenc_fn = lambda: fastenc.ops.layer_norm(x, w, b, eps, r, backend="triton", strict=True)
        kernel_fn = lambda: kernels.layer_norm_forward(x, w, b, eps, r)
        cuda_fn = lambda: fastenc.ops.layer_norm(x, w, b, eps, r, backend="cuda", strict=True)
        cuda_kernel_fn = lambda: _cuda.cuda_layer_norm_forward(x, w, b, eps, r)
    else:

        def eager(x, r):
            s = x if r is None else x + r
            return rms_norm_reference(s, w, eps=eps), s  # the T5LayerNorm formula

        fastenc_fn = lambda: fastenc.ops.rms_norm(x, w, eps, r, backend="triton", strict=True)
        kernel_fn = lambda: kernels.rms_norm_forward(x, w, eps, r)
        cuda_fn = lambda: fastenc.ops.rms_norm(x, w, eps, r, backend="cuda", strict=True)
        cuda_kernel_fn = lambda: _cuda.cuda_rms_norm_forward(x, w, eps, r)
    compiled = torch.compile(eager, dynamic=False)
    return {
        "fastenc": fastenc_fn,
        "kernel": kernel_fn,
        "cuda": cuda_fn,  # the op on the csrc/ CUDA kernel
        "cuda_kernel": cuda_kernel_fn,  # its launcher (fastenc/core/cuda.py)
        "torch": lambda: eager(x, r),
        "compile": lambda: compiled(x, r),
    }


BACKWARD_PROVIDERS = ("fastenc", "cuda", "kernel", "reference", "torch")


def bytes_moved_backward(op, rows, n, dtype, weight_dtype, residual) -> int:
    """Compulsory traffic of the backward: read dy, s (+ ds), write dx (+ dresidual); weights and their gradients."""
    elt = torch.empty((), dtype=dtype).element_size()
    w_elt = torch.empty((), dtype=weight_dtype).element_size()
    return rows * n * elt * (3 + 2 * int(residual)) + 2 * n * w_elt * (2 if op == "layer_norm" else 1)


def backward_providers(op, x, r, w, b, eps, dy, ds):
    """name -> callable returning the input gradients (dx first) of one backward; forwards are taken once here."""
    import fastenc
    from fastenc.kernels import norm as kernels
    from fastenc.ops import _library
    from fastenc.ops.reference import rms_norm_reference

    layer = op == "layer_norm"
    leaves = [t.detach().clone().requires_grad_() for t in (x, r, w, b if layer else None) if t is not None]
    grads_out = [dy] if r is None else [dy, ds]

    def through(backend):
        xl, rl = leaves[0], leaves[1] if r is not None else None
        wl, bl = leaves[2 if r is not None else 1], (leaves[-1] if layer else None)
        if layer:
            out = fastenc.ops.layer_norm(xl, wl, bl, eps, rl, backend=backend, strict=True)
        else:
            out = fastenc.ops.rms_norm(xl, wl, eps, rl, backend=backend, strict=True)
        outs = list(out) if r is not None else [out]
        return lambda: torch.autograd.grad(outs, leaves, grads_out[: len(outs)], retain_graph=True)

    def eager():
        xl, rl = leaves[0], leaves[1] if r is not None else None
        wl = leaves[2 if r is not None else 1]
        s = xl if rl is None else xl + rl
        if layer:
            y = F.layer_norm(s, (s.shape[-1],), wl.to(s.dtype), leaves[-1].to(s.dtype), eps)
        else:
            y = rms_norm_reference(s, wl, eps=eps)
        outs = [y] if rl is None else [y, s]
        return lambda: torch.autograd.grad(outs, leaves, grads_out, retain_graph=True)

    s = x if r is None else x + r
    if layer:
        kernel = lambda: kernels.layer_norm_backward(dy, ds, s, w, b, eps, r is not None)
        args = (x, w, b, r, eps)
    else:
        kernel = lambda: kernels.rms_norm_backward(dy, ds, s, w, eps, r is not None)
        args = (x, w, r, eps)
    diff = [i for i, t in enumerate(args) if isinstance(t, torch.Tensor)]
    ref = _library._references()[op]
    makers = {
        "fastenc": lambda: through("triton"),
        "cuda": lambda: through("cuda"),
        "kernel": lambda: kernel,
        "reference": lambda: lambda: [g for g in _library._vjp_grads(ref, args, diff, grads_out) if g is not None],
        "torch": eager,
    }
    return makers


def fp32_reference(op, x, r, w, b, eps):
    s = (x if r is None else x + r).float()  # the residual sum rounded to x.dtype first, as every provider does
    if op == "layer_norm":
        return F.layer_norm(s, (s.shape[-1],), w.float(), b.float(), eps)
    return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * w.float()


def fp32_reference_dx(op, x, r, w, b, eps, dy, ds):
    """dx (== dresidual) of sum(y * dy) + sum(s * ds) in fp32, at s rounded to x.dtype as every provider has it."""
    s = (x if r is None else x + r).float().requires_grad_()
    y = fp32_reference(op, s, None, w, b, eps)
    loss = (y * dy.float()).sum() + ((s * ds.float()).sum() if ds is not None else 0)
    return torch.autograd.grad(loss, s)[0]


parse_shape = shape_parser("ROWS,N")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=[*OPS, "both"], default="both")
    p.add_argument("--shape", type=parse_shape, action="append", help="ROWS,N (repeatable); default: encoder shapes")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--weight-dtype", choices=["same", "fp32"], default="same", help="weight/bias dtype")
    p.add_argument("--residual", action="store_true", help="fuse s = x + residual and also return s")
    p.add_argument("--eps", type=float, default=1e-5)
    p.add_argument("--backward", action="store_true", help="time the backward instead (see the module docstring)")
    p.add_argument("--providers", default=None, help=f"comma list from {PROVIDERS}; --backward: {BACKWARD_PROVIDERS}")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--out", help="JSON file to append rows to (a bare name goes under bench/results/)")
    args = p.parse_args(argv)

    if no_cuda("bench_norm: no CUDA device found; this benchmark times GPU kernels and needs one."):
        return EXIT_NO_CUDA

    from fastenc.kernels.norm import _NUM_WARPS_BY_BLOCK_N, _NUM_WARPS_BY_BLOCK_N_BWD, _norm_config

    allowed = BACKWARD_PROVIDERS if args.backward else PROVIDERS
    names = parse_providers(p, args.providers or ",".join(allowed), allowed)
    mode = "backward" if args.backward else "forward"
    ops = OPS if args.op == "both" else (args.op,)
    dtype = DTYPES[args.dtype]
    weight_dtype = dtype if args.weight_dtype == "same" else torch.float32
    env = kernel_env()
    print_kernel_env(env)
    print(f"# {mode}  dtype {args.dtype}  weight {args.weight_dtype}  residual {args.residual}  eps {args.eps}")
    header = f"{'op':>10} {'ROWS,N':>12} {'provider':>9} {'p50 ms':>9} {'p20 ms':>9} {'p80 ms':>9}"
    print(f"{header} {'GB/s':>8} {'max err':>9}")

    rows_out = []
    torch.manual_seed(0)
    for op in ops:
        for rows, n in args.shape or DEFAULT_SHAPES:
            x, r, w, b = make_inputs(rows, n, dtype, weight_dtype, args.residual)
            if args.backward:
                y_dtype = weight_dtype if op == "rms_norm" and weight_dtype != torch.float32 else dtype
                dy = torch.randn(rows, n, device="cuda").to(y_dtype)
                ds = torch.randn(rows, n, device="cuda").to(dtype) if args.residual else None
                fns = {k: lazy_provider(m) for k, m in backward_providers(op, x, r, w, b, args.eps, dy, ds).items()}
                ref = fp32_reference_dx(op, x, r, w, b, args.eps, dy, ds)
                nbytes = bytes_moved_backward(op, rows, n, dtype, weight_dtype, args.residual)
            else:
                fns = providers(op, x, r, w, b, args.eps)
                ref = fp32_reference(op, x, r, w, b, args.eps)
                nbytes = bytes_moved(op, rows, n, dtype, weight_dtype, args.residual)
            block_n, num_warps = _norm_config(n, _NUM_WARPS_BY_BLOCK_N_BWD if args.backward else _NUM_WARPS_BY_BLOCK_N)
            config = {"BLOCK_N": block_n, "num_warps": num_warps}
            for name in names:
                fn = fns[name]
                shape = f"{rows},{n}"
                got = bench_provider(
                    fn,
                    lambda y, ref=ref: (first(y).float() - ref).abs().max().item(),
                    args.warmup,
                    args.rep,
                    f"{op:>10} {shape:>12} {name:>9}",
                )
                if isinstance(got, str):
                    rows_out.append(
                        kernel_error_row(
                            "bench_norm",
                            env,
                            op,
                            name,
                            got,
                            mode=mode,
                            config={"rows": rows, "N": n},
                            dtype=args.dtype,
                            shape={"rows": rows, "N": n},
                        )
                    )
                    continue
                err, samples = got
                p20, p50, p80 = (percentile(samples, q) for q in (20, 50, 80))
                gbps = nbytes / (p50 * 1e-3) / 1e9
                print(f"{op:>10} {shape:>12} {name:>9} {p50:9.4f} {p20:9.4f} {p80:9.4f} {gbps:8.1f} {err:9.2e}")
                rows_out.append(
                    kernel_row(
                        "bench_norm",
                        env,
                        op,
                        name,
                        samples,
                        mode=mode,
                        config={"rows": rows, "N": n},
                        dtype=args.dtype,
                        shape={"rows": rows, "N": n},
                        weight_dtype=args.weight_dtype,
                        residual=args.residual,
                        eps=args.eps,
                        kernel_config=config if name in ("fastenc", "kernel") else None,
                        bytes=nbytes,
                        gbps_p50=gbps,
                        max_abs_err_vs_fp32=err,
                        budget_ms={"warmup": args.warmup, "rep": args.rep},
                    )
                )

    if args.out:
        save_results(args.out, rows_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

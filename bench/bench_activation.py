"""Time fastenc's Triton bias + activation (and gated activation) against torch on CUDA.

    python bench/bench_activation.py                                    # quick_gelu, gelu, gelu_tanh; fp16
    python bench/bench_activation.py --activation gelu_tanh --gated     # T5 v1.1 gated-gelu: act(gate) * up
    python bench/bench_activation.py --shape 16384,2816 --no-bias --out act.json
    python bench/bench_activation.py --backward                         # training: dx and dbias (dgate, dup)

Shapes are ROWS,N with ROWS = batch * sequence and N the FFN width. Providers: fastenc (the op, backend="triton"),
kernel (the launcher alone), torch (eager: act(x + bias) in the input dtype;
act(gate) * up), compile (torch.compile of the torch provider). Times are triton.testing.do_bench quantiles
(p20/p50/p80, ms); GB/s = bytes() / p50, counting only the compulsory traffic. With --out, rows (provider, shape,
config, timings, gpu, versions, git commit) are appended to a JSON list under bench/results/.

--backward times the gradient of a forward taken once (retain_graph): fastenc / cuda (autograd through the op: the
fused Triton backward), kernel (bias_activation_backward / gated_activation_backward alone), reference
(torch.func.vjp of the reference formula: the op's backward before the fused kernels), torch (eager autograd).
Bytes: read dy and x (gate, up), write dx (dgate, dup). The error column is dx's (dgate's) against fp32 autograd.
"""

from __future__ import annotations

import argparse
import sys

import torch
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

# ROWS, N: CLIP text B/32 FFN (64 x 77, 3072), ViT-L/14 (32 x 257, 4096), ViT-H/14 (16 x 257, 5120),
# T5 v1.1-large gated FFN (32 x 512, 2816).
DEFAULT_SHAPES = [(4928, 3072), (8224, 4096), (4112, 5120), (16384, 2816)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh", "relu")
PROVIDERS = ("fastenc", "kernel", "cuda", "cuda_kernel", "torch", "compile")


def bytes_moved(rows: int, n: int, dtype: torch.dtype, *, bias: bool, gated: bool) -> int:
    """Compulsory HBM traffic: read x (gate and up when gated), write y, read the (fp32 here) bias once."""
    elt = torch.empty((), dtype=dtype).element_size()
    return rows * n * elt * (3 if gated else 2) + (n * 4 if bias and not gated else 0)


def providers(activation, x, bias, up, gated):
    import fastenc
    from fastenc.core import cuda as _cuda
    from fastenc.kernels import activation as kernels
    from fastenc.ops.reference import activation_reference

    if gated:
        eager = lambda x, up: activation_reference(x, activation) * up
        fns = {
            "fastenc": lambda: fastenc.ops.gated_activation(x, up, activation, backend="triton", strict=True),
            "kernel": lambda: kernels.gated_activation_forward(x, up, activation),
            "cuda": lambda: fastenc.ops.gated_activation(x, up, activation, backend="cuda", strict=True),
            "cuda_kernel": lambda: _cuda.cuda_gated_activation_forward(x, up, activation),
            "torch": lambda: eager(x, up),
        }
        compiled = torch.compile(eager, dynamic=False)
        fns["compile"] = lambda: compiled(x, up)
        return fns
    b_eager = None if bias is None else bias.to(x.dtype)
    eager = lambda x: activation_reference(x if b_eager is None else x + b_eager, activation)  # in x.dtype
    compiled = torch.compile(eager, dynamic=False)
    return {
        "fastenc": lambda: fastenc.ops.bias_activation(x, bias, activation, backend="triton", strict=True),
        "kernel": lambda: kernels.bias_activation_forward(x, bias, activation),
        "cuda": lambda: fastenc.ops.bias_activation(x, bias, activation, backend="cuda", strict=True),
        "cuda_kernel": lambda: _cuda.cuda_bias_activation_forward(x, bias, activation),
        "torch": lambda: eager(x),
        "compile": lambda: compiled(x),
    }


BACKWARD_PROVIDERS = ("fastenc", "cuda", "kernel", "reference", "torch")


def bytes_moved_backward(rows: int, n: int, dtype: torch.dtype, *, bias: bool, gated: bool) -> int:
    """Compulsory traffic of the backward: read dy, x (gate, up); write dx (dgate, dup); the bias and its gradient."""
    elt = torch.empty((), dtype=dtype).element_size()
    return rows * n * elt * (5 if gated else 3) + (2 * n * 4 if bias and not gated else 0)


def backward_providers(activation, x, bias, up, gated, dy):
    """name -> maker of a callable returning the input gradients (dx / dgate first); forwards are taken once."""
    import fastenc
    from fastenc.kernels import activation as kernels
    from fastenc.ops import _library
    from fastenc.ops.reference import activation_reference

    kind = "gated_activation" if gated else "bias_activation"
    b = up if gated else bias
    leaves = [t.detach().clone().requires_grad_() for t in (x, b) if t is not None]
    bl = leaves[1] if b is not None else None

    def through(backend):
        op = fastenc.ops.gated_activation if gated else fastenc.ops.bias_activation
        y = op(leaves[0], bl, activation, backend=backend, strict=True)
        return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)

    def eager():
        if gated:
            y = activation_reference(leaves[0], activation) * bl
        else:
            y = activation_reference(leaves[0] if bl is None else leaves[0] + bl.to(x.dtype), activation)
        return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)

    launcher = getattr(kernels, f"{kind}_backward")
    args = (x, b, activation)
    diff = [i for i in (0, 1) if args[i] is not None]
    ref = _library._references()[kind]
    return {
        "fastenc": lambda: through("triton"),
        "cuda": lambda: through("cuda"),
        "kernel": lambda: lambda: launcher(dy, x, b, activation),
        "reference": lambda: lambda: [g for g in _library._vjp_grads(ref, args, diff, [dy]) if g is not None],
        "torch": eager,
    }


def fp32_reference_grad(activation, x, bias, up, gated, dy):
    """dx (dgate when gated) of sum(y * dy) in fp32."""
    xl = x.float().requires_grad_()
    y = fp32_reference(activation, xl, bias, up, gated)
    return torch.autograd.grad((y * dy.float()).sum(), xl)[0]


def fp32_reference(activation, x, bias, up, gated):
    from fastenc.ops.reference import activation_reference

    if gated:
        return activation_reference(x.float(), activation) * up.float()
    return activation_reference(x.float() if bias is None else x.float() + bias.float(), activation)


parse_shape = shape_parser("ROWS,N")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--activation", choices=ACTIVATIONS, action="append", help="repeatable; default: the three gelus")
    p.add_argument("--shape", type=parse_shape, action="append", help="ROWS,N (repeatable); default: encoder FFNs")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--no-bias", action="store_true", help="activation only (bias already fused into the matmul)")
    p.add_argument("--gated", action="store_true", help="time act(gate) * up (gated_activation) instead")
    p.add_argument("--backward", action="store_true", help="time the backward instead (see the module docstring)")
    p.add_argument("--providers", default=None, help=f"comma list from {PROVIDERS}; --backward: {BACKWARD_PROVIDERS}")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--out", help="JSON file to append rows to (a bare name goes under bench/results/)")
    args = p.parse_args(argv)

    if no_cuda("bench_activation: no CUDA device found; it times GPU kernels and needs one."):
        return EXIT_NO_CUDA

    from fastenc.kernels.activation import _elementwise_config

    allowed = BACKWARD_PROVIDERS if args.backward else PROVIDERS
    names = parse_providers(p, args.providers or ",".join(allowed), allowed)
    mode = "backward" if args.backward else "forward"
    op_name = "gated_activation" if args.gated else "bias_activation"
    activations = args.activation or ["quick_gelu", "gelu", "gelu_tanh"]
    dtype = DTYPES[args.dtype]
    has_bias = not args.no_bias and not args.gated
    env = kernel_env()
    print_kernel_env(env)
    print(f"# {mode}  dtype {args.dtype}  bias {has_bias}  gated {args.gated}")
    header = f"{'activation':>10} {'ROWS,N':>12} {'provider':>9} {'p50 ms':>9} {'p20 ms':>9} {'p80 ms':>9}"
    print(f"{header} {'GB/s':>8} {'max err':>9}")

    rows_out = []
    torch.manual_seed(0)
    for activation in activations:
        for rows, n in args.shape or DEFAULT_SHAPES:
            x = torch.randn(rows, n, dtype=dtype, device="cuda")
            up = torch.randn(rows, n, dtype=dtype, device="cuda") if args.gated else None
            bias = torch.randn(n, device="cuda") if has_bias else None  # fp32, as a Linear bias kept in fp32
            if args.backward:
                dy = torch.randn(rows, n, dtype=dtype, device="cuda")
                makers = backward_providers(activation, x, bias, up, args.gated, dy)
                fns = {k: lazy_provider(m) for k, m in makers.items()}
                ref = fp32_reference_grad(activation, x, bias, up, args.gated, dy)
                nbytes = bytes_moved_backward(rows, n, dtype, bias=has_bias, gated=args.gated)
            else:
                fns = providers(activation, x, bias, up, args.gated)
                ref = fp32_reference(activation, x, bias, up, args.gated)
                nbytes = bytes_moved(rows, n, dtype, bias=has_bias, gated=args.gated)
            block_m, block_n, num_warps = _elementwise_config(n)
            for name in names:
                fn = fns[name]
                shape = f"{rows},{n}"
                got = bench_provider(
                    fn,
                    lambda y, ref=ref: (first(y).float() - ref).abs().max().item(),
                    args.warmup,
                    args.rep,
                    f"{activation:>10} {shape:>12} {name:>9}",
                )
                if isinstance(got, str):
                    rows_out.append(
                        kernel_error_row(
                            "bench_activation",
                            env,
                            op_name,
                            name,
                            got,
                            mode=mode,
                            config={"rows": rows, "N": n},
                            dtype=args.dtype,
                            activation=activation,
                            shape={"rows": rows, "N": n},
                        )
                    )
                    continue
                err, samples = got
                p20, p50, p80 = (percentile(samples, q) for q in (20, 50, 80))
                gbps = nbytes / (p50 * 1e-3) / 1e9
                print(f"{activation:>10} {shape:>12} {name:>9} {p50:9.4f} {p20:9.4f} {p80:9.4f} {gbps:8.1f} {err:9.2e}")
                config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps}
                rows_out.append(
                    kernel_row(
                        "bench_activation",
                        env,
                        op_name,
                        name,
                        samples,
                        mode=mode,
                        config={"rows": rows, "N": n},
                        dtype=args.dtype,
                        activation=activation,
                        shape={"rows": rows, "N": n},
                        bias=has_bias,
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

"""`fastenc bench`: the same model and inputs through transformers eager / SDPA, torch.compile, fastenc,
onnxruntime and TensorRT in one process; JSONL rows, a Markdown table and PNG plots.

    fastenc bench --quick                          # tiny towers on the CPU: proves the harness, not the speed
    fastenc bench --list                           # the matrix that would run, nothing timed
    fastenc bench --models clip-vit-l-14-text,clip-vit-l-14-vision --dtype fp16 --batch 1,32,256
    fastenc bench --report bench/results/models-h100.jsonl     # tables and plots again from stored rows
    fastenc bench --pipeline /local/sdxl --dtype fp16 --batch 1,4   # encode_prompt: eager vs fastenc (+ graphs)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .._cli_common import split_ints, split_names
from ..core.errors import FastencError, InputError
from . import competitors as comp
from . import matrix


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to an argparse subparsers object; its func is cmd_bench."""
    s = subparsers.add_parser(
        "bench",
        help="latency / throughput / memory / MFU of fastenc against eager, SDPA, torch.compile, onnxruntime",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--quick", action="store_true", help="tiny towers, fp32, batch 1,2, few iterations, CPU")
    s.add_argument("--list", action="store_true", help="print the models, competitors and cases, then exit")
    s.add_argument("--models", nargs="+", help=f"comma list (default: the full-size ones): {', '.join(matrix.MODELS)}")
    s.add_argument("--competitors", nargs="+", help=f"comma list; known: {', '.join(comp.COMPETITORS)}")
    s.add_argument("--batch", nargs="+", help=f"comma list (default {','.join(map(str, matrix.DEFAULT_BATCHES))})")
    s.add_argument("--dtype", nargs="+", help="comma list of fp32,fp16,bf16 (default fp16,bf16,fp32)")
    s.add_argument(
        "--seq", nargs="+", help="T5 sequence lengths (default 77,128,256,512); CLIP text is 77, SigLIP text 64"
    )
    s.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available; --quick: cpu)")
    s.add_argument("--out", type=Path, default=None, help="JSONL file the rows are appended to")
    s.add_argument("--warmup", type=int, default=None, help="untimed calls per row after the first (default 10)")
    s.add_argument("--iters", type=int, default=None, help="timed calls per row (default 50)")
    s.add_argument(
        "--throughput-iters", type=int, default=None, help="back-to-back calls for throughput (default 20; 0: none)"
    )
    s.add_argument("--no-l2-flush", action="store_true", help="do not flush L2 before each timed call (CUDA)")
    s.add_argument("--row-budget", type=float, default=None, help="seconds per row before iterations are cut")
    s.add_argument("--peak-n", type=int, default=None, help="side of the peak-measuring matmul (8192 CUDA)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; --quick: 1)")
    s.add_argument("--label", default="", help="free text stored in every row")
    s.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--report", type=Path, default=None, help="no run: tables and plots from this JSONL file")
    s.add_argument("--verbose", action="store_true", help="print tracebacks of error rows")
    s.add_argument(
        "--pipeline",
        default=None,
        help="a local diffusers pipeline folder: time its encode_prompt eager vs fastenc (+ CUDA graphs, cache hit)",
    )
    s.add_argument("--prompt", default=None, help="the prompt for --pipeline (default: a 20-word prompt)")
    s.set_defaults(func=cmd_bench)
    return s


def _default_out(quick: bool, device: str) -> Path:
    from .env import SOURCE_ROOT

    name = ("quick-" if quick else "models-") + device + ".jsonl"
    if (SOURCE_ROOT / "bench").is_dir() and (SOURCE_ROOT / "fastenc").is_dir():  # a source checkout
        return SOURCE_ROOT / "bench" / "results" / name
    return Path("fastenc-bench") / name


def resolve(args):
    """A BenchConfig from parsed arguments (the defaults depend on --quick and the device)."""
    from .runner import BenchConfig

    quick = args.quick
    models = split_names(args.models) or list(matrix.QUICK_MODELS if quick else matrix.FULL_MODELS)
    competitors = split_names(args.competitors) or list(comp.QUICK_DEFAULT if quick else comp.GPU_DEFAULT)
    bad = [m for m in models if m not in matrix.MODELS] + [c for c in competitors if c not in comp.COMPETITORS]
    if bad:
        raise InputError(
            f"unknown {bad}; models: {', '.join(matrix.MODELS)}; competitors: {', '.join(comp.COMPETITORS)}"
        )
    dtypes = split_names(args.dtype) or list(matrix.QUICK_DTYPES if quick else matrix.DEFAULT_DTYPES)
    if set(dtypes) - set(matrix.DTYPES):
        raise InputError(f"--dtype takes {', '.join(matrix.DTYPES)}, got {dtypes}")
    if args.device:
        from .._cli_common import parse_device

        parse_device(args.device)  # InputError for a string torch does not know, or CUDA where there is none
        device = args.device
    elif quick:
        device = "cpu"
    else:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    for flag in ("warmup", "iters", "throughput_iters"):
        if getattr(args, flag) is not None and getattr(args, flag) < (1 if flag == "iters" else 0):
            raise InputError(f"--{flag.replace('_', '-')} is too small")
    batches = split_ints(args.batch) or list(matrix.QUICK_BATCHES if quick else matrix.DEFAULT_BATCHES)
    if min(batches) < 1:
        raise InputError("--batch values must be >= 1")
    seqs = split_ints(args.seq)
    if seqs is not None and min(seqs) < 1:
        raise InputError("--seq values must be >= 1")
    return BenchConfig(
        models=models,
        competitors=competitors,
        batches=batches,
        dtypes=dtypes,
        seqs=seqs,
        device=device,
        warmup=args.warmup if args.warmup is not None else (1 if quick else 10),
        iters=args.iters if args.iters is not None else (5 if quick else 50),
        throughput_iters=args.throughput_iters if args.throughput_iters is not None else (3 if quick else 20),
        flush_l2=not args.no_l2_flush,
        row_budget_s=args.row_budget if args.row_budget is not None else (20.0 if quick else 60.0),
        peak_n=args.peak_n or (256 if quick and device == "cpu" else None),
        out=args.out or _default_out(quick, re.sub(r"\W+", "", device)),
        progress=not args.no_progress,
        quick=quick,
        label=args.label,
        verbose=args.verbose,
        threads=args.threads if args.threads is not None else (1 if quick else None),
    )


def print_list(cfg) -> None:
    print(f"device {cfg.device}; dtypes {','.join(cfg.dtypes)}; competitors {','.join(cfg.competitors)}")
    total = 0
    for m in cfg.models:
        spec = matrix.MODELS[m]
        seqs = spec.seqs(cfg.seqs)
        n = len(seqs) * len(cfg.batches) * len(cfg.dtypes)
        total += n
        print(f"  {spec.label:<40} {spec.family:<6} {spec.tower:<7} seq {','.join(map(str, seqs)):<14} {n} cases")
    print(f"{total} cases x {len(cfg.competitors)} competitors = {total * len(cfg.competitors)} rows")
    print("known models: " + ", ".join(matrix.MODELS))
    print("known competitors: " + ", ".join(comp.COMPETITORS))


def cmd_bench(args) -> int:
    """Handler of `fastenc bench`: 0, or 2 with one `fastenc bench: error: ...` line on bad input."""
    try:
        return _cmd_bench(args)
    except FastencError as e:
        from .._cli_common import fail

        return fail("bench", e)


def _read_report(path: Path) -> list:
    from .runner import read_jsonl

    if not path.is_file():
        raise InputError(f"--report {str(path)!r} is not a file (a JSONL file of `fastenc bench --out` rows)")
    try:
        rows = read_jsonl(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InputError(f"--report {str(path)!r} is not readable as JSONL rows: {e}") from None
    if not rows:
        raise InputError(f"--report {str(path)!r} holds no rows")
    return rows


def _cmd_bench(args) -> int:
    if args.pipeline is not None:
        from .pipeline import cmd_bench_pipeline

        return cmd_bench_pipeline(args)
    from . import report

    if args.report is not None:
        rows = report.latest(_read_report(args.report))
        written = report.write_report(rows, args.report, with_plots=not args.no_plots)
        print(written["text"])
        print(f"# wrote {written['markdown']} and {len(written['plots'])} plots")
        return 0
    cfg = resolve(args)
    if args.list:
        print_list(cfg)
        return 0
    from .runner import run

    rows = run(cfg)
    written = report.write_report(rows, cfg.out, with_plots=not args.no_plots)
    print(written["text"])
    print(f"# appended {len(rows)} rows to {cfg.out}; wrote {written['markdown']} and {len(written['plots'])} plots")
    return 0


def bench_main(argv=None) -> int:
    """`python -m fastenc.benchmark.cli ...` and bench/bench_models.py: the bench subcommand on its own."""
    p = argparse.ArgumentParser(prog="fastenc")
    add_bench_parser(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(bench_main())

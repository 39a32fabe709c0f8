"""fastenc command line.

fastenc demo   [--shape ViT-B/32] [--backend auto] [--dtype fp32] [--batch 4] [--layers N] [--json]
fastenc parity --model PATH [...]   (a local transformers checkpoint directory; nothing is downloaded)
fastenc tokens --tokenizer PATH "prompt" [--chunk] [--json]     token budget, what the 77-token limit cuts off
fastenc probe  --model PATH --prompt "..." [--image IMG] [--text-only] [--pairs FILE] [--json]
fastenc export --model PATH | --shape NAME  --out DIR [--tower text|vision|joint] [--fp16] [--optimize] [...]
fastenc bench  [--quick] [--models ...] [--competitors ...] [--batch ...] [--dtype ...] [--out FILE.jsonl] [--list]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastenc", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (
        ("demo", "build a CLIP model with random weights (or load --model), optimize it, print parity and backends"),
        ("parity", "parity of fastenc against transformers for a local checkpoint (--model is required)"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--model", help="local checkpoint directory (save_pretrained layout); never downloaded")
        s.add_argument(
            "--shape", default="ViT-B/32", help="named random-weight shape when no --model (default %(default)s)"
        )
        s.add_argument("--layers", type=int, default=None, help="reduce both towers to N layers (labelled in output)")
        s.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"])
        s.add_argument("--strict", action="store_true", help="raise instead of falling back")
        s.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
        s.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
        s.add_argument("--batch", type=int, default=4)
        s.add_argument("--seq", type=int, default=None, help="text sequence length (default: the model's maximum)")
        s.add_argument("--json", action="store_true", help="print the report as JSON")
    from .benchmark.cli import add_bench_parser
    from .diagnostics.probe import add_probe_parser
    from .diagnostics.tokens import add_tokens_parser
    from .export.cli import add_export_parser

    add_tokens_parser(sub)
    add_probe_parser(sub)
    add_bench_parser(sub)
    add_export_parser(sub)
    return p


def _load(args, torch):
    from transformers import AutoConfig, AutoModel, CLIPModel

    from .models.configs import clip_config

    if args.model:
        if not os.path.isdir(args.model):
            raise SystemExit(f"fastenc: --model {args.model!r} is not a directory (a local save_pretrained checkpoint)")
        cfg = AutoConfig.from_pretrained(args.model, local_files_only=True)
        if args.layers:
            raise SystemExit("fastenc: --layers applies to random-weight shapes only, not to --model")
        model = AutoModel.from_pretrained(args.model, config=cfg, local_files_only=True)
        return model, args.model
    if args.layers is not None and args.layers < 1:
        raise SystemExit(f"fastenc: --layers must be >= 1, got {args.layers}")
    torch.manual_seed(0)
    model = CLIPModel(clip_config(args.shape, layers=args.layers))
    label = f"random-weight CLIP {args.shape}" + (f" reduced to {args.layers} layers" if args.layers else "")
    return model, label


def cmd_parity(args) -> int:
    import torch

    if args.backend == "triton" and not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        print("fastenc: no CUDA device; Triton kernels run on the CPU interpreter (slow; try --layers 1 --batch 2)")
        _reexec_with_interpreter(args.argv)
    import fastenc
    from fastenc.parity import clip_inputs, compare

    if args.batch < 1:
        raise SystemExit(f"fastenc: --batch must be >= 1, got {args.batch}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, DTYPES[args.dtype])
    model, label = _load(args, torch)
    model = model.to(device=device, dtype=dtype).eval()
    fast = fastenc.optimize(model, backend=args.backend, strict=args.strict)
    inputs = clip_inputs(model.config, args.batch, device=device, dtype=dtype, seq=args.seq)
    report = compare(model, fast, inputs)
    report.model = f"{type(model).__name__} ({label})"
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"fastenc {fastenc.__version__}; backends available here: {', '.join(fastenc.available_backends())}")
        print(report.table())
    return 0 if report.ok else 1


def _reexec_with_interpreter(argv: list[str]) -> None:
    """Run this command again in a process that starts with TRITON_INTERPRET=1. Setting it here would be too late:
    `import fastenc` imports transformers, which imports triton, and triton fixes the interpreter mode of its own
    library functions when it is imported."""
    sys.stdout.flush()
    env = dict(os.environ, TRITON_INTERPRET="1")
    os.execve(sys.executable, [sys.executable, "-m", "fastenc.cli", *argv], env)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    if args.cmd not in ("demo", "parity"):
        return args.func(args)
    if args.cmd == "parity" and not args.model:
        raise SystemExit("fastenc parity: --model PATH is required (use `fastenc demo` for random weights)")
    return cmd_parity(args)


if __name__ == "__main__":
    sys.exit(main())

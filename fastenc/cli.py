"""fastenc command line.

fastenc demo   [--shape ViT-B/32] [--backend auto] [--dtype fp32] [--batch 4] [--layers N] [--json]
fastenc parity --model PATH [...]   (a local transformers checkpoint directory; nothing is downloaded)
fastenc tokens --tokenizer PATH "prompt" [--chunk] [--json]     token budget, what the 77-token limit cuts off
fastenc probe  --model PATH --prompt "..." [--image IMG] [--text-only] [--pairs FILE] [--json]
fastenc export --model PATH | --shape NAME  --out DIR [--tower text|vision|joint] [--fp16] [--optimize] [...]
fastenc bench  [--quick] [--models ...] [--competitors ...] [--batch ...] [--dtype ...] [--out FILE.jsonl] [--list]
fastenc bench  --pipeline DIR [--prompt ...]      encode_prompt of a diffusers pipeline: eager vs fastenc (+ graphs)
fastenc encode --pipeline DIR --prompt "..." [--negative-prompt "..."] [--out embeds.safetensors] [--json]
fastenc embed  --model DIR --input SRC --out DIR [--tower image|text|both] [--batch N] [--ray [ADDRESS]] [...]
fastenc search --index DIR (--text "..." | --image IMG | --ids FILE) [--k K] [--faiss IVF-PQ] [--json]
fastenc finetune --model DIR | --tiny [clip|siglip]  --data DIR | --synthetic N  [--steps ...] [--accum ...] [...]
fastenc cache  [--clear [--what onnx|prompts|digests|cuda|autotune|all]] [--prompt-cache DIR] [--json]

Exit status: 0 on success, 1 when a parity check fails (tokens: the prompt is truncated), 2 on bad input (one line on
stderr, `fastenc <command>: error: ...`, no traceback).
"""

# Each subcommand's parser comes from a module that imports no torch (the heavy work is imported inside the command's
# run function), so `fastenc --help` and `fastenc <command> --help` answer without loading torch or transformers.

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from ._cli_common import (
    DTYPES,
    CommandParser,
    check_backend_env,
    fail,
    load_checkpoint,
    parse_device,
    rerun_with_triton_interpreter,
)


def _parser() -> argparse.ArgumentParser:
    from .models.configs import CLIP_SHAPES

    p = CommandParser(prog="fastenc", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (
        ("demo", "build a CLIP model with random weights (or load --model), optimize it, print parity and backends"),
        ("parity", "parity of fastenc against transformers for a local checkpoint (--model is required)"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--model", help="local checkpoint directory (save_pretrained layout); never downloaded")
        s.add_argument(
            "--shape",
            default="ViT-B/32",
            choices=sorted(CLIP_SHAPES),
            help="named random-weight shape when no --model (default %(default)s)",
        )
        s.add_argument("--layers", type=int, default=None, help="reduce both towers to N layers (labelled in output)")
        s.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda", "onnxruntime"])
        s.add_argument("--strict", action="store_true", help="raise instead of falling back")
        s.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
        s.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
        s.add_argument("--batch", type=int, default=4)
        s.add_argument("--seq", type=int, default=None, help="text sequence length (default: the model's maximum)")
        s.add_argument("--json", action="store_true", help="print the report as JSON")
        if name == "demo":
            s.add_argument("--speed-calls", type=int, default=20, help="interleaved calls behind the closing speed "
                           "line: transformers eager / SDPA vs fastenc's best backend (0: none)")  # fmt: skip
    from .benchmark.cli import add_bench_parser
    from .diagnostics.probe import add_probe_parser
    from .diagnostics.tokens import add_tokens_parser
    from .export.cli import add_export_parser

    add_tokens_parser(sub)
    add_probe_parser(sub)
    add_bench_parser(sub)
    add_export_parser(sub)
    from .pipelines_cli import add_encode_parser

    add_encode_parser(sub)
    from .embed.cli import add_embed_parsers  # fastenc embed / fastenc search

    add_embed_parsers(sub)
    from .train_config import add_arguments as add_finetune_arguments  # fastenc finetune

    s = sub.add_parser("finetune", help="contrastive fine-tuning of a CLIP / SigLIP model (fused towers and loss)")
    add_finetune_arguments(s)
    s.set_defaults(func=cmd_finetune)
    from .cache_cli import add_cache_parser  # fastenc cache

    add_cache_parser(sub)
    return p


def _demo_model(args, torch):
    """(model, label) of demo / parity: the --model checkpoint, or a random-weight CLIP of --shape."""
    from transformers import CLIPModel

    from .core.errors import InputError
    from .models.configs import clip_config

    if args.model:
        if args.layers:
            raise InputError("--layers applies to random-weight shapes only, not to --model")
        return load_checkpoint(args.model), args.model
    torch.manual_seed(0)
    model = CLIPModel(clip_config(args.shape, layers=args.layers))
    label = f"random-weight CLIP {args.shape}" + (f" reduced to {args.layers} layers" if args.layers else "")
    return model, label


def _check_parity_args(args):
    """Every argument check of demo / parity, before anything is loaded or re-executed."""
    from .core.errors import InputError

    if args.cmd == "parity" and not args.model:
        raise InputError("--model PATH is required (use `fastenc demo` for random weights)")
    for flag in ("batch", "layers", "seq"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag} must be >= 1, got {value}")
    if getattr(args, "speed_calls", 0) < 0:
        raise InputError(f"--speed-calls must be >= 0, got {args.speed_calls}")
    check_backend_env()
    return parse_device(args.device)


def cmd_parity(args) -> int:
    import torch

    from .core.errors import InputError

    device = _check_parity_args(args)
    if args.backend == "triton" and not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        print("fastenc: no CUDA device; Triton kernels run on the CPU interpreter (slow; try --layers 1 --batch 2)")
        rerun_with_triton_interpreter(args.argv)
    import fastenc
    from fastenc.parity import clip_inputs, compare

    dtype = getattr(torch, DTYPES[args.dtype])
    model, label = _demo_model(args, torch)
    if not type(model).__name__.startswith("CLIP"):
        raise InputError(f"--model {args.model!r} holds a {type(model).__name__}; demo / parity take CLIP checkpoints")
    text = getattr(model.config, "text_config", None) or model.config
    top = getattr(text, "max_position_embeddings", None)
    if args.seq is not None and top is not None and args.seq > top:
        raise InputError(f"--seq {args.seq} is longer than the model's {top} text positions")
    model = model.to(device=device, dtype=dtype).eval()
    fast = fastenc.optimize(model, backend=args.backend, strict=args.strict)
    inputs = clip_inputs(model.config, args.batch, device=device, dtype=dtype, seq=args.seq)
    report = compare(model, fast, inputs, requested=args.backend)
    report.model = f"{type(model).__name__} ({label})"
    speed = None
    if getattr(args, "speed_calls", 0):  # demo: the speed half of the promise, measured here (benchmark/speed.py)
        from .benchmark.speed import speed_report

        if not args.json:
            print(f"fastenc {fastenc.__version__}; backends available here: {', '.join(fastenc.available_backends())}")
            print(report.table(), flush=True)
            print(f"timing {args.speed_calls} interleaved calls (the first fastenc call may export to ONNX)...",
                  flush=True)  # fmt: skip

        def progress(line):  # stderr: the report and the closing speed line on stdout stay as they are
            print(f"fastenc {args.cmd}: {line}", file=sys.stderr, flush=True)

        speed = speed_report(model, inputs, fast=fast, calls=args.speed_calls, progress=progress)
    if args.json:
        print(json.dumps({**report.to_dict(), **({"speed": speed} if speed else {})}, indent=2))
    elif speed:
        from .benchmark.speed import speed_line

        print(speed_line(speed))
    else:
        print(f"fastenc {fastenc.__version__}; backends available here: {', '.join(fastenc.available_backends())}")
        print(report.table())
    return 0 if report.ok else 1


def cmd_finetune(args) -> int:
    """Handler of `fastenc finetune`: fastenc.train.run_cli (imported here; it loads torch)."""
    from .train import run_cli

    return run_cli(args)


def main(argv=None) -> int:
    """Run one subcommand. Bad input of any subcommand (a FastencError: InputError, UnsupportedModelError,
    BackendUnavailableError) ends in one `fastenc <command>: error: ...` line and exit status 2; argparse's own
    errors look the same. Anything else is a bug and keeps its traceback."""
    from .core.errors import FastencError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings(args.cmd, warnings.showwarning)
        try:
            if args.cmd in ("demo", "parity"):
                return cmd_parity(args)
            return args.func(args)
        except FastencError as e:
            return fail(args.cmd, e)
        except KeyboardInterrupt:
            print(f"fastenc {args.cmd}: interrupted", file=sys.stderr)
            return 130


def _one_line_warnings(command: str, other):
    """fastenc's own warnings (fall-backs, cache writes, config mismatches) as one `fastenc <command>: <Kind>: ...`
    line on stderr instead of Python's file:line form with a source line; other libraries' warnings unchanged."""

    def show(message, category, filename, lineno, file=None, line=None):
        if not category.__module__.startswith("fastenc"):
            return other(message, category, filename, lineno, file, line)
        text = " ".join(str(message).split()).removeprefix("fastenc: ")
        print(f"fastenc {command}: {category.__name__}: {text}", file=file or sys.stderr)

    return show


if __name__ == "__main__":
    sys.exit(main())

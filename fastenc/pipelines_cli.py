"""`fastenc encode`: a diffusers pipeline's encode_prompt through fastenc, with per-encoder time and output shapes.

    fastenc encode --pipeline DIR --prompt "a red cat" [--prompt ...] [--negative-prompt "..."] [--out FILE]

Bad input raises fastenc.InputError, which fastenc.cli.main prints as one `fastenc encode: error: ...` line.
"""

from __future__ import annotations

import json
import os

MAX_SEQUENCE_LENGTH = 512  # the T5 length diffusers' SD3 / FLUX pipelines accept (their check_inputs)


def add_encode_parser(sub) -> None:
    s = sub.add_parser(
        "encode",
        help="run a diffusers pipeline's encode_prompt through fastenc: per-encoder time and shapes, optional file",
    )
    s.add_argument("--pipeline", required=True, help="local DiffusionPipeline.save_pretrained folder; never downloaded")
    s.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    s.add_argument("--negative-prompt", action="append", default=None, help="negative prompt(s): enables CFG outputs")
    s.add_argument("--out", default=None, help="write every returned tensor to this .safetensors file")
    s.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"])
    s.add_argument("--strict", action="store_true", help="raise instead of falling back")
    s.add_argument("--no-optimize", action="store_true", help="the untouched pipeline (the reference)")
    s.add_argument("--dtype", default="fp32", choices=["bf16", "fp16", "fp32"])
    s.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    s.add_argument("--images-per-prompt", type=int, default=1, help="copies of each embedding (>= 1)")
    s.add_argument(
        "--clip-skip",
        type=int,
        default=None,
        help="layers to skip from the end (CLIP encoders): 0..L for SD 1.x, 0..L-1 for SDXL / SD3 (L: encoder layers)",
    )
    s.add_argument(
        "--max-sequence-length", type=int, default=None, help=f"T5 tokens (SD3 / FLUX), 1..{MAX_SEQUENCE_LENGTH}"
    )
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=cmd_encode)


def cmd_encode(args) -> int:
    """Handler of `fastenc encode`: load the pipeline, optimize it (unless --no-optimize), run its encode_prompt
    once to warm up and once timed, print per-encoder time and output shapes; --out writes the tensors."""
    import time

    import torch

    from ._cli_common import DTYPES, check_backend_env, parse_device, rerun_with_triton_interpreter
    from .core.errors import InputError

    for flag in ("images_per_prompt", "max_sequence_length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.max_sequence_length is not None and args.max_sequence_length > MAX_SEQUENCE_LENGTH:
        raise InputError(f"--max-sequence-length must be in [1, {MAX_SEQUENCE_LENGTH}], got {args.max_sequence_length}")
    if args.clip_skip is not None and args.clip_skip < 0:
        raise InputError(f"--clip-skip must be >= 0, got {args.clip_skip}")
    if args.negative_prompt is not None and len(args.negative_prompt) not in (1, len(args.prompt)):
        raise InputError(
            f"--negative-prompt given {len(args.negative_prompt)} times; give it once or once per --prompt "
            f"({len(args.prompt)})"
        )
    if args.out is not None:
        parent = os.path.dirname(os.path.abspath(args.out))
        if os.path.isdir(args.out):
            raise InputError(f"--out {args.out!r} is a directory; give the path of a .safetensors file to write")
        if not os.path.isdir(parent):
            why = "is not a directory" if os.path.exists(parent) else "does not exist"
            raise InputError(f"--out {args.out!r}: folder {parent!r} {why}")
    check_backend_env()
    device = parse_device(args.device)
    if args.backend == "triton" and device.type == "cpu" and "TRITON_INTERPRET" not in os.environ:
        print("fastenc: no CUDA device; Triton kernels run on the CPU interpreter (slow)")
        rerun_with_triton_interpreter(args.argv)
    import fastenc

    from .pipelines import EncoderTimer, check_clip_skip, encode_prompt, load_pipeline

    dtype = getattr(torch, DTYPES[args.dtype])
    pipe = load_pipeline(args.pipeline, dtype=dtype, device=device)
    check_clip_skip(pipe, args.clip_skip, flag="--clip-skip")  # its range is the pipeline's encoders' layer count
    if not args.no_optimize:
        fastenc.optimize(pipe, backend=args.backend, strict=args.strict)
    prompts = args.prompt if len(args.prompt) > 1 else args.prompt[0]
    negative = args.negative_prompt
    if negative is not None and len(negative) == 1 and len(args.prompt) > 1:
        negative = negative * len(args.prompt)
    kw = dict(
        negative_prompt=negative if negative is None or len(negative) > 1 else negative[0],
        num_images_per_prompt=args.images_per_prompt,
        clip_skip=args.clip_skip,
        max_sequence_length=args.max_sequence_length,
        device=device,
    )
    encode_prompt(pipe, prompts, **kw)  # warm-up (first-call costs: kernel compiles, fused buffers)
    with EncoderTimer(pipe) as timer:
        t0 = time.perf_counter()
        out = encode_prompt(pipe, prompts, **kw)
        total = time.perf_counter() - t0
    report = {
        "pipeline": type(pipe).__name__,
        "optimized": not args.no_optimize,
        "backend": args.backend,
        "dtype": args.dtype,
        "device": str(device),
        "encode_prompt_ms": round(total * 1e3, 3),
        "encoders": {
            name: {
                "class": type(getattr(pipe, name)).__name__,
                "calls": timer.calls[name],
                "ms": round(timer.seconds[name] * 1e3, 3),
            }
            for name in timer.seconds
        },
        "outputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in out.items()},
        "finite": {k: bool(torch.isfinite(v).all()) for k, v in out.items() if v.dtype.is_floating_point},
    }
    if args.out is not None:
        from safetensors.torch import save

        from .core.files import atomic_write_bytes

        data = save({k: v.detach().cpu().contiguous() for k, v in out.items()})
        try:  # all or nothing under the name: a full disk never leaves a partial file
            atomic_write_bytes(os.path.abspath(args.out), data)
        except OSError as e:
            raise InputError(f"--out {args.out!r}: cannot write {len(data)} bytes: {e.strerror or e}") from None
        report["out"] = args.out
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{report['pipeline']} ({'fastenc ' + args.backend if report['optimized'] else 'untouched'}, "
        f"{args.dtype}, {device}): encode_prompt {report['encode_prompt_ms']:.2f} ms"
    )
    for name, row in report["encoders"].items():
        print(f"  {name:<16} {row['class']:<36} {row['calls']} call(s) {row['ms']:>10.2f} ms")
    for name, row in report["outputs"].items():
        flag = "" if report["finite"].get(name, True) else "  NON-FINITE"
        print(f"  {name:<32} {str(tuple(row['shape'])):<18} {row['dtype']}{flag}")
    if args.out is not None:
        print(f"# wrote {len(out)} tensors to {args.out}")
    return 0

"""`fastenc export`: ONNX (optionally ORT-fused, fp16), a TensorRT engine and / or a Triton model repository for a
local checkpoint or a random-weight named shape, then a parity table of ONNX Runtime against transformers.

    fastenc export --model DIR [--tower text|vision|joint] --out model.onnx [--opset N] [--fp16] [--no-optimize]
    fastenc export --model DIR --tower text --out text.onnx --attention-mask     (mask as an input; default input_ids)
    fastenc export --shape tiny --tower text --out clip_text.onnx                    (random weights, nothing loaded)
    fastenc export --shape t5-base --layers 2 --out t5.onnx
    fastenc export --model DIR --tensorrt model.plan                                  (needs tensorrt and a GPU)
    fastenc export --model DIR --triton-repo repo/ --name clip_text [--backend onnxruntime|tensorrt]

Nothing is downloaded: --model is a local save_pretrained folder. Exit status: 0 when parity passes, 1 when it does
not, 2 on bad input (the message names the argument; no file is left half-written).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from ..core.errors import FastencError, InputError

T5_SHAPES = {  # d_model, d_kv, heads, d_ff, layers, feed_forward_proj, vocab
    "t5-tiny": (32, 16, 2, 64, 2, "gated-gelu", 1000),
    "t5-base": (768, 64, 12, 2048, 12, "gated-gelu", 32128),  # T5 v1.1 / Flan-T5 base encoder
    "t5-xxl": (4096, 64, 64, 10240, 24, "gated-gelu", 32128),  # the SD3 / FLUX text encoder
}
TOWERS = ("text", "vision", "joint")


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Add `export` to an argparse subparsers object; the handler is `run_export(args) -> int`."""
    from ..models.configs import CLIP_SHAPES

    s = subparsers.add_parser(
        "export",
        help="ONNX / TensorRT / Triton repository export of a CLIP, SigLIP or T5 encoder, with a parity check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = s.add_mutually_exclusive_group()
    src.add_argument("--model", help="local checkpoint directory (save_pretrained layout); never downloaded")
    src.add_argument(
        "--shape",
        choices=sorted(CLIP_SHAPES) + sorted(T5_SHAPES),
        help="random-weight model of a named shape (CLIP shapes or t5-*); default tiny when no --model",
    )
    s.add_argument("--layers", type=int, default=None, help="reduce a --shape model to N layers per tower")
    s.add_argument("--tower", choices=TOWERS, default=None, help="CLIP/SigLIP: text, vision or joint (default joint)")
    s.add_argument("--out", help="ONNX file to write (with only --triton-repo, parity runs on the repository's file)")
    s.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18, at least 17)")
    s.add_argument("--fp16", action="store_true", help="export an fp16 graph (parity at 2e-2 relative)")
    s.add_argument(
        "--optimize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run ONNX Runtime's transformer fusions (default: on, off when --tensorrt or --backend tensorrt)",
    )
    s.add_argument(
        "--attention-mask",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="export attention_mask as an input (default: as Optimum's config for the tower: CLIP text, SigLIP and T5 "
        "take input_ids only, the joint CLIPModel also attention_mask)",
    )
    s.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript")
    s.add_argument("--tensorrt", metavar="ENGINE", help="also build a TensorRT engine from the (unfused) ONNX file")
    s.add_argument("--triton-repo", metavar="DIR", help="also write a Triton model repository entry under DIR")
    s.add_argument("--name", help="Triton model name (default: derived from the model class)")
    s.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime", help="Triton backend")
    s.add_argument("--max-batch-size", type=int, default=None, help="Triton max_batch_size (default 64)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing Triton model folder")
    s.add_argument("--no-parity", action="store_true", help="skip the ONNX Runtime vs transformers check")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=run_export)
    return s


def _load_model(args):
    """(model, label) for --model / --shape and --tower; every failure is an InputError naming the argument."""
    import torch

    if args.layers is not None and args.layers < 1:
        raise InputError(f"--layers must be >= 1, got {args.layers}")
    if args.model:
        from .._cli_common import load_checkpoint

        if args.layers:
            raise InputError("--layers applies to --shape models only")
        model = load_checkpoint(args.model, "--model")  # InputError: not a folder, no config.json, not loadable
        label = args.model
    else:
        shape = args.shape or "tiny"
        torch.manual_seed(0)
        if shape in T5_SHAPES:
            from transformers import T5Config, T5EncoderModel

            d, dkv, h, ff, n, act, vocab = T5_SHAPES[shape]
            cfg = T5Config(vocab_size=vocab, d_model=d, d_kv=dkv, num_heads=h, d_ff=ff, num_layers=args.layers or n,
                           feed_forward_proj=act)  # fmt: skip
            model = T5EncoderModel(cfg)
        else:
            from transformers import CLIPModel

            from ..models.configs import clip_config

            model = CLIPModel(clip_config(shape, layers=args.layers))
        label = f"random-weight {shape}" + (f" reduced to {args.layers} layers" if args.layers else "")
    return _select_tower(model.eval(), args.tower), label


def _select_tower(model, tower: str | None):
    """The text or vision tower of a joint CLIP / SigLIP model as its own transformers model, same weights."""
    import transformers as tf

    name = type(model).__name__
    pairs = {
        "CLIPModel": ("CLIPTextModelWithProjection", "CLIPVisionModelWithProjection"),
        "SiglipModel": ("SiglipTextModel", "SiglipVisionModel"),
    }
    if tower in (None, "joint"):
        return model
    if name not in pairs:
        raise InputError(f"--tower {tower} needs a joint CLIPModel or SiglipModel, got {name}")
    cls = getattr(tf, pairs[name][0 if tower == "text" else 1])
    sub_cfg = copy.deepcopy(model.config.text_config if tower == "text" else model.config.vision_config)
    if hasattr(model.config, "projection_dim"):  # CLIP: the joint config holds the projection width
        sub_cfg.projection_dim = model.config.projection_dim
    sub = cls(sub_cfg)
    sub_keys = set(sub.state_dict())
    state = {k: v for k, v in model.state_dict().items() if k in sub_keys}
    sub.load_state_dict(state, strict=True)
    return sub.to(next(model.parameters()).dtype).eval()


def run_export(args) -> int:
    try:
        return _run(args)
    except FastencError as e:
        from .._cli_common import fail

        return fail("export", e)


def _run(args) -> int:
    import torch
    from tqdm import tqdm

    from . import export_onnx, onnx_parity, to_tensorrt, to_triton_repository
    from .onnx_export import check_opset, check_output_path

    # argument checks first: nothing is built or written for a bad command line
    if not (args.out or args.triton_repo):
        raise InputError("give --out FILE.onnx and / or --triton-repo DIR")
    if args.name and not args.triton_repo:
        raise InputError("--name applies to --triton-repo")
    unfused = bool(args.tensorrt) or (args.triton_repo and args.backend == "tensorrt")
    optimize = (not unfused) if args.optimize is None else args.optimize
    if optimize and args.tensorrt:
        raise InputError("--optimize makes ORT-only ops that TensorRT cannot parse; use --no-optimize with --tensorrt")
    check_opset(args.opset, args.exporter)
    out = check_output_path(args.out) if args.out else None
    if args.tensorrt:
        check_output_path(args.tensorrt)
        from .tensorrt_engine import _check_tensorrt

        _check_tensorrt()

    if args.layers is not None and args.layers < 1:
        raise InputError(f"--layers must be >= 1, got {args.layers}")
    if args.model:
        from .._cli_common import check_checkpoint_dir

        if args.layers:
            raise InputError("--layers applies to --shape models only")
        check_checkpoint_dir(args.model, "--model")

    steps = 1 + (out is not None) + bool(args.tensorrt) + bool(args.triton_repo)
    bar = tqdm(total=steps, desc="fastenc export", disable=args.no_progress, file=sys.stderr)

    def say(msg):
        bar.set_postfix_str(msg[:60])

    result = {}
    try:
        bar.set_description("loading model")
        model, label = _load_model(args)
        bar.update()
        dtype = torch.float16 if args.fp16 else None
        if out is not None:
            bar.set_description("exporting ONNX")
            report = export_onnx(model, out, opset=args.opset, dtype=dtype, optimize=optimize,
                                 exporter=args.exporter, attention_mask=args.attention_mask, progress=say)  # fmt: skip
            result["onnx"] = report.to_dict()
            bar.update()
            if not args.no_parity:
                bar.set_description("parity (ONNX Runtime vs transformers)")
                parity = onnx_parity(model, out)
                result["parity"] = parity.to_dict()
        if args.tensorrt:
            bar.set_description("building TensorRT engine")
            # the FP16 builder flag lets TensorRT pick fp16 kernels per layer, also from an fp32 graph
            result["tensorrt"] = str(to_tensorrt(out, args.tensorrt, fp16=True))
            bar.update()
        if args.triton_repo:
            bar.set_description("writing Triton repository")
            name = args.name or type(model).__name__.lower()
            entry = to_triton_repository(
                model,
                args.triton_repo,
                name,
                backend=args.backend,
                max_batch_size=args.max_batch_size,
                dtype=dtype,
                opset=args.opset,
                optimize=optimize if args.backend == "onnxruntime" else False,
                attention_mask=args.attention_mask,
                overwrite=args.overwrite,
                progress=say,
            )
            result["triton"] = str(entry)
            bar.update()
            if out is None and args.backend == "onnxruntime" and not args.no_parity:
                bar.set_description("parity (ONNX Runtime vs transformers)")
                parity = onnx_parity(model, entry / "1" / "model.onnx")
                result["parity"] = parity.to_dict()
    except BaseException:
        bar.leave = False  # an error line follows: no half-finished bar left on the screen above it
        raise
    finally:
        bar.close()

    if args.json:
        print(json.dumps({"model": label, **result}, indent=2, default=str))
    else:
        print(f"model: {type(model).__name__} ({label})")
        if "onnx" in result:
            print(report.summary())
        if "tensorrt" in result:
            print(f"TensorRT engine: {result['tensorrt']}")
        if "triton" in result:
            entry = Path(result["triton"])
            print(f"Triton repository entry: {entry} ({', '.join(sorted(_files(entry)))})")
        if "parity" in result:
            print(parity.table())
    return 0 if "parity" not in result or result["parity"]["ok"] else 1


def _files(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]

"""`fastenc embed` and `fastenc search` (registered by fastenc.cli through add_embed_parsers).

    fastenc embed  --model DIR --input SRC --out DIR [--tower image|text|both] [--batch N] [--dtype fp16] [...]
    fastenc search --index DIR (--text "..." | --image IMG | --ids FILE) [--k K] [--faiss IVF-PQ] [--json]

Bad input raises fastenc.InputError, which fastenc.cli.main prints as one `fastenc <command>: error: ...` line.
"""

from __future__ import annotations

import json
import os
import sys

from .reader import IMAGE_KEYS, MAX_IMAGE_BYTES


def add_embed_parsers(sub) -> None:
    s = sub.add_parser("embed", help="embed a dataset (image folder, WebDataset tars, Parquet / CSV) into shards")
    s.add_argument("--model", required=True, help="local CLIPModel / SiglipModel checkpoint folder; never downloaded")
    s.add_argument("--input", required=True, help="image folder, folder of .tar shards, .tar, .parquet or .csv")
    s.add_argument("--out", required=True, help="output folder (a rerun into it resumes)")
    s.add_argument("--tower", default="image", choices=["image", "text", "both"])
    s.add_argument("--batch", type=int, default=256, help="model batch (fixed; the last of a shard is padded)")
    s.add_argument("--shard-size", type=int, default=10000, help="samples per output shard")
    s.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"], help="model dtype (default fp16 on cuda)")
    s.add_argument("--store", default="fp16", choices=["fp16", "fp32"], help="dtype of the stored embeddings")
    s.add_argument("--format", default="npy", choices=["npy", "parquet"], help="embedding files")
    s.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"])
    s.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    s.add_argument("--workers", type=int, default=None, help="loader processes (default min(8, cpus - 1))")
    s.add_argument("--no-cuda-graphs", action="store_true", help="run the model eagerly on CUDA")
    s.add_argument("--caption-col", default=None, help="table column holding captions")
    s.add_argument("--image-col", default=None, help="table column holding image paths or bytes")
    s.add_argument("--id-col", default=None, help="table column holding sample ids (default: row number)")
    s.add_argument("--image-key", default=IMAGE_KEYS, metavar="FIELDS",
                   help=f"WebDataset image fields, first present wins (default {IMAGE_KEYS}; k.seg.png is field "
                   "seg.png)")  # fmt: skip
    s.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES, metavar="N",
                   help=f"a larger image or caption fails its sample unread (default {MAX_IMAGE_BYTES})")  # fmt: skip
    s.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray Data (a cluster address, or none for a local cluster)")  # fmt: skip
    s.add_argument("--ray-cpus", type=int, default=None, help="Ray: decode actors (default: the cluster's CPUs)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=cmd_embed)

    q = sub.add_parser("search", help="top-k cosine search over a `fastenc embed` output folder")
    q.add_argument("--index", required=True, help="output folder of fastenc embed")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", action="append", help="a text query (repeat for several)")
    g.add_argument("--image", action="append", help="an image file query (repeat for several)")
    g.add_argument("--ids", help="file with one indexed sample id per line: their neighbours")
    q.add_argument("--k", type=int, default=10)
    q.add_argument("--tower", default=None, choices=["image", "text"], help="embeddings searched (default image)")
    q.add_argument(
        "--model", default=None, help="checkpoint for the queries (default: the one the index was made with)"
    )
    q.add_argument("--faiss", default=None, metavar="SPEC", help="FAISS index: IVF-PQ or an index_factory string")
    q.add_argument("--nprobe", type=int, default=None, help="FAISS IVF lists probed")
    q.add_argument("--device", default=None)
    q.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"])
    q.add_argument("--json", action="store_true", help="print the hits as JSON lines")
    q.set_defaults(func=cmd_search)


def cmd_embed(args) -> int:
    from .._cli_common import check_backend_env
    from ..core.errors import InputError
    from .pipeline import EmbedConfig

    check_backend_env()
    cfg = EmbedConfig(
        model=args.model, input=args.input, out=args.out, tower=args.tower, batch=args.batch,
        shard_size=args.shard_size, dtype=args.dtype, store=args.store, format=args.format, backend=args.backend,
        device=args.device, workers=args.workers, cuda_graphs=not args.no_cuda_graphs, caption_col=args.caption_col,
        image_col=args.image_col, id_col=args.id_col, image_key=args.image_key, max_image_bytes=args.max_image_bytes,
        progress=not args.quiet,
    )  # fmt: skip
    cfg.check()
    if args.ray is not None:
        from .ray_backend import embed_ray

        if args.ray_cpus is not None and args.ray_cpus < 1:
            raise InputError(f"--ray-cpus must be >= 1, got {args.ray_cpus}")
        report = embed_ray(cfg, address=args.ray or None, decode_actors=args.ray_cpus)
    else:
        from .pipeline import embed

        report = embed(cfg)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(report.summary())
    return 0


def _warn_search(message: str) -> None:
    print(f"fastenc search: warning: {message}", file=sys.stderr)


def cmd_search(args) -> int:
    from ..core.errors import InputError
    from .search import search

    ids = None
    if args.ids is not None:
        if not os.path.isfile(args.ids):
            raise InputError(f"--ids {args.ids!r} does not exist")
        try:
            with open(args.ids, encoding="utf-8") as f:
                ids = [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError as e:
            raise InputError(
                f"--ids {args.ids!r} is not UTF-8 text (byte {e.start}): expected one sample id per line"
            ) from None
        except OSError as e:
            raise InputError(f"--ids {args.ids!r} cannot be read: {e.strerror or e}") from None
        if not ids:
            raise InputError(f"--ids {args.ids!r} holds no ids")
    if args.nprobe is not None and args.nprobe < 1:
        raise InputError(f"--nprobe must be >= 1, got {args.nprobe}")
    results = search(args.index, text=args.text, images=args.image, ids=ids, k=args.k, tower=args.tower,
                     model=args.model, faiss=args.faiss, nprobe=args.nprobe, device=args.device,
                     backend=args.backend, on_warning=_warn_search)  # fmt: skip
    labels = args.text or args.image or ids
    for qi, hits in enumerate(results):
        if args.json:
            for h in hits:
                print(json.dumps({"query_text": labels[qi], **h.to_dict()}))
            continue
        print(f"query {qi}: {labels[qi]}")
        for h in hits:
            cap = f"  {h.caption!r}" if h.caption else ""
            print(f"  {h.rank + 1:>3}  {h.score:+.4f}  {h.id}  ({h.path}, shard {h.shard} row {h.row}){cap}")
    sys.stdout.flush()
    return 0

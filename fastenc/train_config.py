"""What `fastenc.train.finetune` takes, without torch: `FinetuneConfig`, the values its options accept, and the same
fields as command-line flags (`add_arguments`, shared by `fastenc finetune` and examples/finetune_clip.py), so the
CLI's parser builds without importing torch. The training loop and the field checks are in fastenc/train.py."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

PRECISIONS = ("fp32", "bf16", "fp16")
AMP_MODES = ("auto", "autocast", "master")
KINDS = ("clip", "siglip")
LOSS_IMPLS = ("fastenc", "materialised")
SCHEDULES = ("cosine", "constant")
BACKENDS = ("auto", "torch", "triton", "cuda")
ON_NONFINITE = ("stop", "skip-step")
DEFAULT_STEPS = 10
MAX_SKIPPED_IN_A_ROW = 10  # on_nonfinite="skip-step": this many non-finite steps in a row stop the run
CHECKPOINT_DIR = "checkpoints"  # under output_dir


@dataclass
class FinetuneConfig:
    """Every knob of `finetune` (the CLI flags have the same names, `_` as `-`)."""

    model: str | None = None  # a local save_pretrained directory (CLIPModel / SiglipModel); never downloaded
    tiny: str | None = None  # "clip" | "siglip": a tiny random-weight model instead of --model
    data: str | None = None  # a folder of images with same-name .txt captions (img2dataset layout)
    synthetic: int = 0  # N random (pixels, tokens) pairs instead of --data
    output_dir: str | None = None  # save_pretrained of the fine-tuned model here (rank 0); checkpoints below it
    steps: int | None = None  # optimizer steps (default DEFAULT_STEPS, or `epochs` passes over the data)
    epochs: int | None = None  # instead of steps: steps = epochs x (pairs // batch_size)
    batch_size: int = 32  # pairs per optimizer step over all ranks and micro-batches (the contrastive batch)
    accum: int = 1  # micro-batches per step and rank
    lr: float = 1e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-6
    warmup: int = 0  # linear warm-up steps
    schedule: str = "cosine"  # after warm-up: "cosine" (to 0 at `steps`) or "constant"
    max_grad_norm: float | None = 1.0  # global-norm clipping; None or 0: off
    precision: str = "fp32"  # fp32 | bf16 | fp16
    amp: str = "auto"  # auto | autocast | master (see fastenc/train.py's docstring)
    backend: str = "auto"  # fastenc backend: auto | torch | triton | cuda
    fused: bool = True  # False: the plain transformers model (same loop and loss; the baseline)
    loss_impl: str = "fastenc"  # fastenc (tiled, no N x N logits) | materialised (open_clip's N x N logits)
    device: str | None = None  # cpu | cuda[:N]; default cuda if available (under torchrun: cuda:LOCAL_RANK)
    seed: int = 0
    shuffle: bool = True
    seq_len: int | None = None  # text length (default: the tokenizer's / the model's maximum)
    workers: int = 0  # DataLoader worker processes
    progress: bool = True  # tqdm bar on rank 0
    save_processor: bool = True  # also save the tokenizer / image processor found with --model
    on_nonfinite: str = "stop"  # non-finite loss / gradient norm: "stop" (NonFiniteError) | "skip-step"
    save_every: int = 0  # a resumable checkpoint every N steps under output_dir/checkpoints (0: none)
    keep_checkpoints: int = 1  # the newest K checkpoints are kept
    resume: str | None = None  # "latest" (the newest under output_dir/checkpoints) or a checkpoint folder


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The FinetuneConfig fields as flags (shared by `fastenc finetune` and examples/finetune_clip.py)."""
    d = FinetuneConfig()
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local CLIPModel / SiglipModel checkpoint directory (never downloaded)")
    src.add_argument("--tiny", nargs="?", const="clip", choices=KINDS, help="tiny random-weight model (default clip)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="folder of images with same-name .txt captions (img2dataset layout)")
    data.add_argument("--synthetic", type=int, metavar="N", help="N random pixel / token pairs")
    p.add_argument("--output-dir", help="save_pretrained the fine-tuned model (and processors) here; checked to be "
                   "a writable folder before training")  # fmt: skip
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {DEFAULT_STEPS})")
    length.add_argument("--epochs", type=int, default=None, help="passes over the data instead of --steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per step over all ranks (%(default)s)")
    p.add_argument("--accum", type=int, default=d.accum, help="micro-batches per step and rank (%(default)s)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0 turns clipping off")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default=d.precision)
    p.add_argument("--amp", choices=AMP_MODES, default=d.amp, help="mixed-precision mode (bf16 / fp16)")
    p.add_argument("--backend", choices=BACKENDS, default=d.backend)
    p.add_argument("--no-fastenc", dest="fused", action="store_false", help="plain transformers (the baseline)")
    p.add_argument("--loss-impl", choices=LOSS_IMPLS, default=d.loss_impl)
    p.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda if available)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--on-nonfinite",
        choices=ON_NONFINITE,
        default=d.on_nonfinite,
        help="a NaN / inf loss or gradient norm: stop (exit 1, the default) or skip that step's update "
        f"(counted; {MAX_SKIPPED_IN_A_ROW} in a row stop the run)",
    )
    p.add_argument(
        "--save-every",
        type=int,
        default=d.save_every,
        metavar="N",
        help=f"a resumable checkpoint every N steps under OUTPUT_DIR/{CHECKPOINT_DIR} (0: none)",
    )
    p.add_argument(
        "--keep-checkpoints", type=int, default=d.keep_checkpoints, metavar="K", help="keep the newest K (%(default)s)"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue a run from its newest checkpoint (or the folder given) with the same options",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")

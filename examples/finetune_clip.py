"""Contrastive fine-tuning of a CLIP or SigLIP model with fastenc's fused towers and losses.

    # a tiny random-weight model on random data (CPU, a few seconds): the smoke test
    python examples/finetune_clip.py --tiny --synthetic 64 --batch-size 16 --steps 5
    # a local checkpoint (save_pretrained directory with its tokenizer and image processor) on an image folder
    # (img2dataset layout: 00000/000000001.jpg + 00000/000000001.txt), bf16, 4 micro-batches per step
    python examples/finetune_clip.py --model /local/clip-vit-b-16 --data /data/pairs --batch-size 1024 --accum 4 \
        --precision bf16 --steps 2000 --lr 1e-5 --warmup 100 --output-dir ft-clip
    # data parallel: every rank takes its shard of each global batch; the loss spans the global batch
    torchrun --nproc-per-node 8 examples/finetune_clip.py --model /local/siglip --data /data/pairs --batch-size 4096
    # resumable: a checkpoint every 500 steps under ft-clip/checkpoints; after a crash or preemption the same command
    # plus --resume continues exactly where the newest checkpoint left off (other options: a clear error)
    python examples/finetune_clip.py --model /local/clip --data /data/pairs --steps 20000 --output-dir ft-clip \
        --save-every 500            # ... killed; then the same command + --resume

The flags are fastenc.train.FinetuneConfig's fields (`fastenc finetune` takes the same). The loop, its gradient
accumulation (exact: open_clip's accum_freq), mixed precision and data parallelism are documented in
fastenc/train.py; the saved model is a plain transformers checkpoint, read back and compared before "saved:" is
printed. Exit status: 0; 1 when training stopped on a non-finite loss / gradient norm (nothing saved); 2 on bad input
or a failed save (one `fastenc finetune: error: ...` line naming the flag).
"""

from __future__ import annotations

import argparse
import os
import sys

if not os.environ.get("TRITON_INTERPRET") and "--device" not in sys.argv:  # CPU machine: Triton's interpreter
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by transformers / fastenc)


def main(argv=None) -> int:
    from fastenc._cli_common import fail
    from fastenc.core.errors import FastencError
    from fastenc.train import run_cli
    from fastenc.train_config import add_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_cli(args)
    except FastencError as e:
        return fail("finetune", e)


if __name__ == "__main__":
    sys.exit(main())

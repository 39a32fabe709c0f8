"""Model-level benchmark: the same tower and inputs through transformers eager / SDPA, torch.compile (default and
max-autotune), fastenc (triton, cuda, with and without CUDA graphs), onnxruntime and TensorRT, in one process.

    python bench/bench_models.py --quick                       # tiny towers on the CPU (what CI runs)
    python bench/bench_models.py --list                        # the matrix, nothing timed
    python bench/bench_models.py --models clip-vit-l-14-text --dtype fp16 --batch 1,32,256

The same entry point as `fastenc bench` (fastenc/benchmark/); see bench/README.md for the method. Rows are
appended to bench/results/*.jsonl, with a Markdown table (.md) and PNG plots (<stem>-plots/) next to them.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    # Triton runs on the CPU through its interpreter only when this is set before fastenc (and triton) import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastenc.benchmark.cli import bench_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench_main())

"""fastenc.benchmark: the harness behind `fastenc bench` and bench/bench_models.py.

matrix       named models (random weights from configs), their inputs, the FLOPs formula, the cases
competitors  one builder per competitor (transformers eager / sdpa, torch.compile, fastenc, onnxruntime, TensorRT)
timing       CUDA-event / perf_counter timing with warm-up, sync and L2 flush; matmul peak; peak memory
runner       runs the matrix in one process, rows appended to a JSONL file
report       Markdown tables and PNG plots
cli          add_bench_parser(subparsers) for `fastenc bench`
"""

from .cli import add_bench_parser, cmd_bench
from .env import git_commit, versions
from .timing import percentile

__all__ = ["add_bench_parser", "cmd_bench", "git_commit", "percentile", "versions"]

"""Scaffolding shared by the bench/ scripts: git commit, environment metadata, the CUDA check, provider / shape
argument parsing and appending JSON rows to an --out file. Timing and percentiles are fastenc.benchmark.timing's
(Timer, percentile), rows are built by fastenc.benchmark.rows.make_row: one timer and one row schema everywhere.

The scripts run as `python bench/bench_x.py`, which puts bench/ on sys.path, so they `from _common import ...`.
torch, triton, transformers and fastenc are imported inside the helpers that need them, so `--help` stays cheap
for the scripts that import torch lazily.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
EXIT_NO_CUDA = 2  # exit status of every script on a machine without a CUDA device


def git_commit(*, dirty: bool = True, cwd: Path | None = REPO) -> str:
    """HEAD's sha, or "unknown" where git fails (fastenc.benchmark.env.git_commit, imported when called so that
    --help stays cheap). dirty=True appends "-dirty" for a modified tree; cwd: where git runs (None: here)."""
    from fastenc.benchmark.env import git_commit as _git_commit

    return _git_commit(dirty=dirty, cwd=cwd)


def no_cuda(message: str) -> bool:
    """True, after printing `message` to stderr, when torch sees no CUDA device (the caller returns EXIT_NO_CUDA)."""
    import torch

    if torch.cuda.is_available():
        return False
    print(message, file=sys.stderr)
    return True


def kernel_env() -> dict:
    """Metadata carried by every row of the kernel benchmarks (attention, norm, activation, contrastive)."""
    import torch
    import triton

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
    }


def print_kernel_env(env: dict) -> None:
    print(f"# {env['gpu']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}")


def model_meta() -> dict:
    """Metadata carried by every row of the model benchmarks (CLIP, T5)."""
    import torch
    import transformers
    import triton

    import fastenc

    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "fastenc": fastenc.__version__,
        "python": platform.python_version(),
        "commit": git_commit(dirty=False, cwd=None),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def model_row(script: str, meta: dict, op: str, provider: str, samples_ms=None, **extra) -> dict:
    """A model benchmark's row (fastenc.benchmark.rows.make_row) with model_meta's metadata, `provider` as both the
    schema's competitor and the row's provider."""
    from fastenc.benchmark.rows import make_row

    libs = ("torch", "triton", "transformers", "onnxruntime", "onnx", "fastenc", "python")
    return make_row(
        script,
        op,
        provider,
        samples_ms=samples_ms,
        device=meta.get("device", ""),
        versions={k: meta[k] for k in libs if k in meta},
        commit=meta.get("commit"),
        provider=provider,
        **extra,
        **{k: v for k, v in meta.items() if k not in ("device", "commit")},
    )


def parse_providers(parser: argparse.ArgumentParser, text: str, allowed: tuple[str, ...]) -> list[str]:
    """The comma list `text` as names; parser.error (exit 2) on a name not in `allowed`."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        parser.error(f"unknown providers {unknown}; choose from {allowed}")
    return names


def shape_parser(spec: str):
    """An argparse type for a comma-separated integer shape named like `spec` (e.g. "ROWS,N" or "B,H,S,D")."""
    count = len(spec.split(","))

    def parse_shape(text: str) -> tuple[int, ...]:
        try:
            dims = tuple(int(x) for x in text.split(","))
            if len(dims) != count:
                raise ValueError(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape must be {spec} ({count} integers), got {text!r}") from None
        return dims

    return parse_shape


def cuda_timer(flush_l2: bool = True, *, host: bool = False):
    """The script's CUDA Timer (fastenc.benchmark.timing.Timer: CUDA events, or with host=True perf_counter with
    a synchronize on either side); one per setting, so the L2 flush buffer is allocated once."""
    import torch

    from fastenc.benchmark.timing import Timer

    key = (flush_l2, host)
    if key not in _TIMERS:
        _TIMERS[key] = Timer(torch.device("cuda"), flush_l2=flush_l2, host=host)
    return _TIMERS[key]


_TIMERS: dict = {}


def kernel_row(script: str, env: dict, op: str, provider: str, samples_ms=None, **extra) -> dict:
    """A kernel benchmark's row (fastenc.benchmark.rows.make_row) with kernel_env's metadata; `provider` is both the
    schema's competitor and the row's provider."""
    from fastenc.benchmark.rows import make_row

    versions = {k: env[k] for k in ("torch", "triton", "cuda") if k in env}
    return make_row(
        script,
        op,
        provider,
        samples_ms=samples_ms,
        device=env.get("gpu", ""),
        versions=versions,
        commit=env.get("commit"),
        provider=provider,
        **extra,
        **{k: v for k, v in env.items() if k != "commit"},
    )


def kernel_error_row(script: str, env: dict, op: str, provider: str, reason: str, **extra) -> dict:
    """The row of a provider that could not run a case (no samples): `reason` is both its notes and its error."""
    return kernel_row(script, env, op, provider, notes=reason, error=reason, **extra)


def lazy_provider(maker):
    """A provider built on its first call (maker() -> the callable), so a provider that cannot run fails inside
    bench_provider's try rather than while the table is set up."""
    built = []

    def fn():
        if not built:
            built.append(maker())
        return built[0]()

    return fn


def first(out):
    """An op's first output (the norms return [y] or [y, x + residual])."""
    return out[0] if isinstance(out, (tuple, list)) else out


def bench_provider(fn, error_of, warmup: int, rep: int, label: str) -> tuple[float, list[float]] | str:
    """(error_of(fn()), samples in ms) for one provider: about `warmup` ms of untimed calls, then about `rep` ms of
    calls each timed on its own (cuda_timer: CUDA events, L2 flushed); the first call also warms up, compiles or
    autotunes.

    A provider that cannot run these inputs (the CUDA extension is not built, the CUDA kernel refuses the shape)
    returns its error text instead, printed after `label`, so the run goes on and the caller records a row
    saying why."""
    try:
        err = error_of(fn())
        return err, cuda_timer().budget_samples(fn, warmup, rep)
    except Exception as e:  # noqa: BLE001 - any provider failure becomes a row with the reason
        print(f"{label} skipped: {type(e).__name__}: {e}"[:200])
        return str(e)


def time_model(model, inputs: dict, warmup: int, iters: int) -> dict:
    """One model's forward on `inputs` under inference_mode (cuda_timer without L2 flush): p50/p90 latency (ms),
    peak memory (MB), raw samples."""
    import torch

    from fastenc.benchmark.timing import percentile

    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        samples = cuda_timer(flush_l2=False).warm_samples(lambda: model(**inputs), warmup, iters)
    return {
        "p50_ms": percentile(samples, 50),
        "p90_ms": percentile(samples, 90),
        "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20,
        "samples_ms": samples,
    }


def add_speedups(results: dict[str, dict], fast: str) -> None:
    """results[name]["fastenc_speedup"] = p50 of `name` / p50 of `fast`, same run."""
    for r in results.values():
        r["fastenc_speedup"] = r["p50_ms"] / results[fast]["p50_ms"]


def append_rows(path: Path, rows: list[dict], *, newline: bool = True) -> None:
    """Append `rows` to the JSON list in `path` (created with its parent folders when missing)."""
    old = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old + rows, indent=1) + ("\n" if newline else ""))


def save_results(out: str, rows: list[dict]) -> None:
    """--out of the kernel benchmarks: a bare file name goes under bench/results/."""
    path = Path(out)
    if path.parent == Path("."):
        path = RESULTS / path
    append_rows(path, rows)
    print(f"# appended {len(rows)} rows to {path}")

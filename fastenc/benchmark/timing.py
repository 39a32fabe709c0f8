"""The one timing module of every benchmark (`fastenc bench` and the bench/ scripts): the Timer, percentiles,
peak matmul throughput and peak memory.

Percentiles are nearest-rank with q on numpy's 0-100 scale: `percentile(samples, 50)` is the median sample itself.

On CUDA every timed call is bracketed by CUDA events after the device is synchronised and, unless disabled, after
L2 is flushed by writing a 256 MiB buffer (larger than any current GPU's L2), so a call never finds the previous
call's weights or activations in cache: each sample is the latency of one call made on its own, launch gaps
included. On CPU, time.perf_counter brackets each call. Raw samples are kept in ms.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .env import reset_rss_peak, rss_mb, rss_peak_mb

L2_FLUSH_BYTES = 256 * 2**20
ESTIMATE_CALLS = 5  # calls that estimate one call's time before a budgeted run sizes its warm-up and samples


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile q (0..100) of samples (the sample value itself, never an interpolation)."""
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def quantiles(samples: list[float]) -> dict:
    """p20 / p50 / p80 (ms) of samples: the three figures every bench row carries."""
    return {f"p{q}_ms": percentile(samples, q) for q in (20, 50, 80)}


@dataclass
class Timer:
    """Times zero-argument callables on `device` (a torch.device).

    host=True uses perf_counter with a device synchronize on either side even on CUDA (for runtimes that do not
    run on torch's current stream, e.g. onnxruntime)."""

    device: object
    flush_l2: bool = True
    host: bool = False

    def __post_init__(self):
        import torch

        self._cuda = self.device.type == "cuda"
        self._flush = (
            torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=self.device) if self._cuda and self.flush_l2 else None
        )

    def host_variant(self) -> Timer:
        """A perf_counter timer (with synchronize) that shares this timer's flush buffer."""
        t = Timer(self.device, flush_l2=False, host=True)
        t._flush = self._flush
        return t

    @property
    def name(self) -> str:
        if not self._cuda:
            return "perf_counter"
        return ("perf_counter+sync" if self.host else "cuda-events") + ("+l2-flush" if self._flush is not None else "")

    def sync(self) -> None:
        if self._cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def once(self, fn) -> float:
        """ms of one call of fn."""
        import torch

        if self._flush is not None:
            self._flush.zero_()
        self.sync()
        if self._cuda and not self.host:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3

    def once_cpu(self, fn, clock=time.thread_time) -> tuple[float, float]:
        """(wall ms, CPU ms on `clock`) of one call of fn, both read around the call (host timing: no events, no
        flush; on CUDA a synchronize on either side). clock: time.thread_time, or time.process_time for all
        threads."""
        self.sync()
        c0, t0 = clock(), time.perf_counter()
        fn()
        self.sync()
        t1, c1 = time.perf_counter(), clock()
        return (t1 - t0) * 1e3, (c1 - c0) * 1e3

    def samples(self, fn, iters: int) -> list[float]:
        """ms of each of `iters` calls of fn, each timed on its own (see once)."""
        return [self.once(fn) for _ in range(iters)]

    def warm_samples(self, fn, warmup: int, iters: int) -> list[float]:
        """`warmup` untimed calls of fn, then samples(fn, iters)."""
        for _ in range(warmup):
            fn()
        self.sync()
        return self.samples(fn, iters)

    def budget_samples(self, fn, warmup_ms: float, rep_ms: float) -> list[float]:
        """Samples sized by time: ESTIMATE_CALLS calls estimate one call, then about warmup_ms of untimed calls
        and about rep_ms of timed ones (at least one each), as the kernel scripts' --warmup / --rep ask."""
        est = max(min(self.samples(fn, ESTIMATE_CALLS)), 1e-6)
        return self.warm_samples(fn, max(1, int(warmup_ms / est)), max(1, int(rep_ms / est)))

    def back_to_back(self, fn, iters: int) -> float:
        """Mean ms per call of `iters` calls issued back to back with one synchronize at the end (no flush):
        what a stream of requests sees, launch overhead overlapped with the previous call's work."""
        self.sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3 / iters

    @property
    def held_bytes(self) -> int:
        return L2_FLUSH_BYTES if self._flush is not None else 0


def summarize(samples: list[float]) -> dict:
    return {
        "p50_ms": percentile(samples, 50),
        "p90_ms": percentile(samples, 90),
        "p99_ms": percentile(samples, 99),
        "mean_ms": sum(samples) / len(samples),
        "min_ms": min(samples),
    }


def matmul_peak(device, dtype_name: str, n: int | None = None, iters: int = 20) -> dict:
    """The device's own matmul throughput in this process: the best of `iters` timed n x n x n torch.matmul calls
    (after warm-up) in `dtype_name` (fp32 runs with torch's current TF32 setting, recorded). MFU divides by it."""
    import torch

    from .matrix import DTYPES

    dtype = getattr(torch, DTYPES[dtype_name])
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    timer = Timer(device, flush_l2=False)
    with torch.inference_mode():
        for _ in range(3):
            torch.matmul(a, b)
        samples = timer.samples(lambda: torch.matmul(a, b), iters)
    flops = 2.0 * n**3
    best = min(samples)
    return {
        "dtype": dtype_name,
        "shape": [n, n, n],
        "flops": flops,
        "best_ms": best,
        "median_ms": percentile(samples, 50),
        "tflops": flops / (best * 1e-3) / 1e12,
        "tf32": bool(cuda and dtype_name == "fp32" and torch.backends.cuda.matmul.allow_tf32),
        "timer": timer.name,
    }


class MemoryMeter:
    """Peak memory of one row. CUDA: torch.cuda.max_memory_allocated over the row, less the timer's flush buffer
    (weights + activations + workspaces held through torch's allocator). CPU: the process RSS high-water mark over
    the row (VmHWM, reset through /proc/self/clear_refs), absolute and as a delta over the RSS at the start."""

    def __init__(self, device, held_bytes: int = 0):
        self.device, self.held = device, held_bytes

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self._note = None
        else:
            self._note = reset_rss_peak()
            self._base = rss_mb()

    def stop(self, *, tracked: bool = True) -> dict:
        """tracked=False: the competitor allocates outside torch (onnxruntime on CUDA), so CUDA figures are null."""
        import torch

        if self.device.type == "cuda":
            if not tracked:
                return {"peak_mem_mb": None, "peak_mem_delta_mb": None, "mem_note": "allocates outside torch"}
            peak = torch.cuda.max_memory_allocated(self.device)
            return {
                "peak_mem_mb": (peak - self.held) / 2**20,
                "peak_mem_delta_mb": (peak - self._base) / 2**20,
                "mem_note": "torch.cuda.max_memory_allocated",
            }
        if self._note is not None:
            return {"peak_mem_mb": None, "peak_mem_delta_mb": None, "mem_note": self._note}
        peak = rss_peak_mb()
        return {
            "peak_mem_mb": peak,
            "peak_mem_delta_mb": None if peak is None or self._base is None else peak - self._base,
            "mem_note": "process RSS high-water mark (VmHWM)",
        }

"""Run the matrix: for each (model, dtype) every competitor is built once and runs every case in this process;
rows are appended to the JSONL file as each (model, dtype) group finishes, so an interrupted run keeps its rows."""

from __future__ import annotations

import gc
import math
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import competitors as comp
from .env import device_info, git_commit, utc_now, versions
from .matrix import DTYPES, MODELS, cases, forward_flops
from .rows import append_jsonl, make_row, read_jsonl
from .timing import MemoryMeter, Timer, matmul_peak, quantiles, summarize

__all__ = ["BenchConfig", "add_speedups", "append_jsonl", "read_jsonl", "run"]
MIN_ITERS = 3


@dataclass
class BenchConfig:
    models: list[str]
    competitors: list[str]
    batches: list[int]
    dtypes: list[str]
    seqs: list[int] | None = None  # T5 only; other towers have fixed lengths
    device: str = "cpu"
    warmup: int = 10
    iters: int = 50
    throughput_iters: int = 20
    flush_l2: bool = True
    row_budget_s: float = 60.0  # per (case, competitor): iterations are cut (to >= MIN_ITERS) to stay inside it
    peak_n: int | None = None  # side of the square matmul that measures the peak (default: 8192 CUDA, 1024 CPU)
    out: Path | None = None  # JSONL file the rows are appended to
    progress: bool = True
    quick: bool = False
    label: str = ""
    verbose: bool = False
    threads: int | None = None  # torch.set_num_threads for the run (quick mode: 1, steadier on a shared CI host)


def _reason(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return text if len(text) <= 600 else text[:597] + "..."


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _slice(out):
    """A small CPU float64 corner of the output that the output check compares across competitors."""
    t = comp.first_output(out)
    if t is None:
        return None
    t = t.detach()
    index = tuple(slice(0, 4) for _ in range(t.dim()))
    return t[index].to("cpu", dtype=__import__("torch").float64)


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, unit="row", desc="fastenc bench", file=sys.stderr)
            except ImportError:
                print("fastenc bench: tqdm is not installed; no progress bar", file=sys.stderr)

    def step(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(cfg: BenchConfig) -> list[dict]:
    """Run the matrix of `cfg`; return every row (also appended to cfg.out when set)."""
    import torch

    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastenc bench: --device cuda but torch sees no CUDA device")
    unknown = sorted(set(cfg.models) - set(MODELS)) + sorted(set(cfg.competitors) - set(comp.COMPETITORS))
    if unknown:
        raise SystemExit(f"fastenc bench: unknown models/competitors {unknown}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = device_info(device)
    meta = {
        "run_id": uuid.uuid4().hex[:12],
        "time": utc_now(),
        "label": cfg.label,
        "device": dev["name"],
        "device_info": dev,
        "versions": versions(),
        "commit": git_commit(),
        "quick": cfg.quick,
    }
    peaks = {d: matmul_peak(device, d, cfg.peak_n) for d in cfg.dtypes}
    # competitors that execute on the host (onnxruntime's CPU EP) are cost-guarded with the host's fp32 peak
    host_peak = peaks["fp32"] if device.type == "cpu" and "fp32" in peaks else matmul_peak(torch.device("cpu"), "fp32")
    timer = Timer(device, flush_l2=cfg.flush_l2)
    host_timer = timer.host_variant()
    st = _Tools(timer, host_timer, MemoryMeter(device, timer.held_bytes), host_peak)
    groups = [(m, d, cases(m, d, cfg.batches, cfg.seqs)) for m in cfg.models for d in cfg.dtypes]
    progress = _Progress(sum(len(c) for *_, c in groups) * len(cfg.competitors), cfg.progress)
    settings = {
        "warmup": cfg.warmup,
        "iters": cfg.iters,
        "throughput_iters": cfg.throughput_iters,
        "row_budget_s": cfg.row_budget_s,
        "timer": timer.name,
    }
    rows: list[dict] = []
    workdir = Path(tempfile.mkdtemp(prefix="fastenc-bench-"))
    try:
        for model_name, dtype_name, group_cases in groups:
            base = dict(meta, settings=settings, peak=peaks[dtype_name])
            group = _run_group(MODELS[model_name], dtype_name, group_cases, cfg, st, base, workdir, progress)
            add_speedups(group)
            rows.extend(group)
            if cfg.out is not None:
                append_jsonl(cfg.out, group)
    finally:
        progress.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def _run_group(spec, dtype_name, group_cases, cfg, st, base, workdir, progress) -> list[dict]:
    """Every competitor on every case of one (model, dtype): each competitor is built once (outside inference
    mode, as users build models) and freed before the next is built."""
    import torch

    device = torch.device(cfg.device)
    ctx = comp.Context(device, getattr(torch, DTYPES[dtype_name]), dtype_name, workdir)
    group: list[dict] = []
    refs: dict = {}
    for name in cfg.competitors:
        runner, skip, status = None, None, "skipped"
        try:
            runner = comp.build(name, spec, ctx)
        except comp.Skip as e:
            skip = str(e)
        except Exception as e:  # noqa: BLE001 (recorded as the row's error, the run goes on)
            skip, status = _reason(e), ("skipped" if _is_oom(e) else "error")
            if _is_oom(e):
                skip = "out of memory while building: " + skip
            if cfg.verbose:
                traceback.print_exc()
        for case in group_cases:
            row = _case_row(base, spec, case, name)
            if runner is None:
                row.update(status=status, reason=skip)
            else:
                with torch.inference_mode():
                    row.update(_run_case(runner, spec, case, ctx, cfg, st, base["peak"], refs))
            row["notes"] = row["reason"] or ""
            group.append(row)
            progress.step(f"{spec.name} {dtype_name} b={case.batch} s={case.seq} {name}: {row['status']}")
        if runner is not None:
            runner.close()
        del runner
        _free(device)
    return group


def _case_row(base: dict, spec, case, competitor: str) -> dict:
    """The row of one (case, competitor) before it runs (fastenc.benchmark.rows.make_row; _run_case adds the
    samples and figures)."""
    config = {
        "model": spec.name,
        "label": spec.label,
        "family": spec.family,
        "tower": spec.tower,
        "shape": spec.shape,
        "layers": spec.num_layers,
        "full_layers": spec.full_layers,
        "batch": case.batch,
        "seq": case.seq,
        "dtype": case.dtype,
        "competitor": competitor,
    }
    meta = {k: v for k, v in base.items() if k not in ("device", "versions", "commit")}
    return make_row(
        "fastenc bench",
        spec.name,
        competitor,
        mode="forward",
        config=config,
        dtype=case.dtype,
        device=base["device"],
        versions=base["versions"],
        commit=base["commit"],
        **meta,
        status="ok",
        reason=None,
        flops=forward_flops(spec, case.batch, case.seq),
    )


@dataclass
class _Tools:
    timer: Timer
    host_timer: Timer
    meter: MemoryMeter
    host_peak: dict


def _run_case(runner, spec, case, ctx, cfg: BenchConfig, st: _Tools, peak: dict, refs: dict) -> dict:
    """Time one competitor on one case; a dict of the row's fields (status skipped/error with a reason)."""
    host_peak, meter = st.host_peak, st.meter
    out = {"provider": runner.provider, "setup_s": runner.setup_s, **runner.extra}
    if runner.max_batch is not None and case.batch > runner.max_batch:
        return {**out, "status": "skipped", "reason": runner.max_batch_reason}
    flops = forward_flops(spec, case.batch, case.seq)
    if runner.on_cpu:
        est = flops / (host_peak["tflops"] * 1e12)
        if est * (1 + MIN_ITERS) > cfg.row_budget_s:
            return {
                **out,
                "status": "skipped",
                "reason": f"runs on the host CPU: ~{est:.1f} s per call at the measured CPU fp32 matmul peak "
                f"({host_peak['tflops']:.2f} TFLOP/s) would exceed the row budget of {cfg.row_budget_s:g} s",
            }
    t = st.host_timer if runner.host_timer else st.timer
    inputs = feed = fn = None
    try:
        inputs = spec.inputs(case.batch, case.seq, ctx.device, ctx.dtype)
        feed = runner.prepare(inputs)
        fn = lambda: runner.call(feed)
        runner.new_case()
        meter.start()
        t0 = time.perf_counter()
        result = fn()
        t.sync()
        first_call_s = time.perf_counter() - t0
        check = _check(result, case.key, runner.name, refs)
        del result
        warm = t.samples(fn, min(cfg.warmup, 1))
        if warm and cfg.warmup > 1:  # the rest of the warm-up takes at most a fifth of the row budget
            more = int(0.2 * cfg.row_budget_s / max(warm[0] * 1e-3, 1e-9))
            warm += t.samples(fn, max(0, min(cfg.warmup - 1, more)))
        per_call_ms = min(warm) if warm else first_call_s * 1e3
        iters, tput_iters = cfg.iters, cfg.throughput_iters
        if per_call_ms * 1e-3 * (iters + tput_iters) > cfg.row_budget_s:
            iters = max(MIN_ITERS, int(cfg.row_budget_s / (per_call_ms * 1e-3) * iters / (iters + tput_iters)))
            tput_iters = min(tput_iters, iters)
        samples = t.samples(fn, iters)
        stream_ms = t.back_to_back(fn, tput_iters) if tput_iters else None
        mem = meter.stop(tracked=runner.mem_tracked)
    except Exception as e:  # noqa: BLE001 (recorded as the row's error, the run goes on)
        oom = _is_oom(e)
        if cfg.verbose:
            traceback.print_exc()
        reason = ("out of memory: " if oom else "") + _reason(e)
        del e
        inputs = feed = fn = None  # noqa: F841 (drop this case's tensors before the allocator cache is emptied)
        _free(ctx.device)
        return {**out, "status": "skipped" if oom else "error", "reason": reason}
    stats = summarize(samples)
    achieved = flops / (stats["p50_ms"] * 1e-3) / 1e12
    return {
        **out,
        **check,
        **quantiles(samples),
        **stats,
        **mem,
        "samples_ms": samples,
        "warmup_ms": warm,
        "iters": iters,
        "iters_cut": iters < cfg.iters,
        "timer": t.name,
        "first_call_s": first_call_s,
        "items_per_s": case.batch / (stats["p50_ms"] * 1e-3),
        "tokens_per_s": case.batch * case.seq / (stats["p50_ms"] * 1e-3),
        "stream_ms": stream_ms,
        "stream_iters": tput_iters,
        "throughput_items_per_s": case.batch / (stream_ms * 1e-3) if stream_ms else None,
        "tflops": achieved,
        "mfu": achieved / peak["tflops"],
    }


def _check(result, key, competitor: str, refs: dict) -> dict:
    """Output check: max |difference| of a corner of the output against the first competitor of the case that
    produced one (eager when it ran), relative to that reference's largest magnitude."""
    got = _slice(result)
    if got is None:
        return {"check_ref": None, "check_max_abs": None, "check_max_rel": None}
    if key not in refs:
        refs[key] = (competitor, got)
        return {"check_ref": competitor, "check_max_abs": 0.0, "check_max_rel": 0.0}
    ref_name, ref = refs[key]
    if ref.shape != got.shape:
        return {"check_ref": ref_name, "check_max_abs": math.inf, "check_max_rel": math.inf}
    diff = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    return {"check_ref": ref_name, "check_max_abs": diff, "check_max_rel": diff / scale if scale > 0 else diff}


def add_speedups(rows: list[dict]) -> None:
    """row["speedup_vs"][other] = other's p50 / this row's p50 for every other ok competitor of the same case
    (same run): > 1 means this row is faster."""
    by_case: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "ok":
            c = r["config"]
            by_case.setdefault((c["model"], c["dtype"], c["batch"], c["seq"]), []).append(r)
    for group in by_case.values():
        for r in group:
            r["speedup_vs"] = {o["config"]["competitor"]: o["p50_ms"] / r["p50_ms"] for o in group if o is not r}

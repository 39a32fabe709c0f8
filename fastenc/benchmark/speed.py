"""The demo's speed line: transformers (eager, SDPA) against fastenc's best backend on this machine, measured here
(`fastenc demo` prints it; `speed_report` returns the figures)."""

from __future__ import annotations

import torch

from ..core.errors import InputError

PROGRESS_EVERY_S = 5.0  # during the timing rounds, a progress line at most this often (and after the first / last)


def speed_report(model, inputs: dict, *, fast=None, calls: int = 20, warmup: int = 2, progress=None) -> dict:
    """transformers (eager and SDPA attention) against fastenc's best backend here, on the same model and inputs:
    ONNX Runtime on a CPU (when installed; the torch backend otherwise), the fused model `fast` and the same with CUDA
    graphs on a GPU (the faster of the two is reported). Timing is interleaved (each round calls every competitor
    once) and reported as the p50 over `calls` rounds; the fastenc backend is named from what `fastenc.trace()`
    recorded in a traced call, not assumed.

    progress: None, or a callable taking one line of text: told what runs (each fastenc candidate's first calls,
    the warm-up, then the timing rounds: after the first and the last and at most every PROGRESS_EVERY_S seconds
    between, with each competitor's p50 so far), so minutes of timing under load never pass in silence."""
    import statistics
    import time

    from ..core.dispatch import onnxruntime_installed
    from ..core.trace import trace
    from ..optimize import optimize
    from ..runtime import SESSION_CONFIG

    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
        raise InputError(f"calls must be an int >= 1, got {calls!r}")
    if progress is not None and not callable(progress):
        raise InputError(f"progress must be None or a callable taking a str, got {type(progress).__name__}")
    say = progress or (lambda _line: None)
    p = next(model.parameters())
    cuda = p.device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(p.device)

    cfg = model.config
    before = cfg._attn_implementation
    spinning = SESSION_CONFIG.get("session.intra_op.allow_spinning")
    SESSION_CONFIG["session.intra_op.allow_spinning"] = "0"  # interleaved with torch: ORT's idle threads must not spin
    try:
        competitors = {}
        for impl in ("eager", "sdpa"):

            def hf(impl=impl):
                model.set_attn_implementation(impl)
                with torch.inference_mode():
                    return model(**inputs)

            competitors[f"transformers {impl}"] = hf
        candidates = []
        if cuda:
            fast = fast if fast is not None else optimize(model)
            candidates = [fast, optimize(model, backend=fast._fastenc.backend, cuda_graphs=True)]
        elif onnxruntime_installed() and p.dtype == torch.float32:
            candidates = [optimize(model, backend="onnxruntime")]
        else:
            candidates = [fast if fast is not None else optimize(model, backend="torch")]
        names = []
        for k, m in enumerate(candidates):
            say(f"fastenc candidate {k + 1}/{len(candidates)}: first calls (may export to ONNX, compile or capture)")
            t0 = time.perf_counter()
            with torch.inference_mode(), trace() as t:
                m(**inputs)  # first call: exports / captures / compiles outside the timing
                m(**inputs)
            backends = sorted({key.split(".", 1)[0] for key in t.counts if not key.endswith(".export")})
            label = "+".join(backends) or "?"
            if getattr(m, "_fastenc_graphs", None) is not None:
                label += " + CUDA graphs"
            names.append(label)
            say(f"fastenc candidate {k + 1}/{len(candidates)}: {label}, ready in {time.perf_counter() - t0:.1f} s")

            def run(m=m):
                with torch.inference_mode():
                    return m(**inputs)

            competitors[f"fastenc {label}#{k}"] = run
        for name, fn in competitors.items():
            say(f"warm-up: {warmup} call(s) of {name.split('#')[0]}")
            for _ in range(warmup):
                fn()
        samples = {k: [] for k in competitors}
        say(f"timing {calls} interleaved round(s) of {len(competitors)} competitors")
        last_said = time.perf_counter()
        for i in range(calls):
            for k, fn in competitors.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                samples[k].append((time.perf_counter() - t0) * 1e3)
            now = time.perf_counter()
            if i in (0, calls - 1) or now - last_said >= PROGRESS_EVERY_S:
                last_said = now
                so_far = ", ".join(f"{k.split('#')[0]} {statistics.median(v):.1f} ms" for k, v in samples.items())
                say(f"round {i + 1}/{calls}: p50 so far {so_far}")
    finally:
        model.set_attn_implementation(before)
        if spinning is None:
            SESSION_CONFIG.pop("session.intra_op.allow_spinning", None)
        else:
            SESSION_CONFIG["session.intra_op.allow_spinning"] = spinning
    p50 = {k: statistics.median(v) for k, v in samples.items()}
    fastenc_keys = [k for k in p50 if k.startswith("fastenc ")]
    best = min(fastenc_keys, key=p50.get)
    return {
        "device": torch.cuda.get_device_name(p.device) if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "calls": calls,
        "p50_ms": {k.split("#")[0]: v for k, v in p50.items()},
        "best": best.split("#")[0].removeprefix("fastenc "),
        "speedup_vs_sdpa": p50["transformers sdpa"] / p50[best],
        "speedup_vs_eager": p50["transformers eager"] / p50[best],
    }


def speed_line(rep: dict) -> str:
    where = rep["device"] if rep["device"] != "cpu" else f"CPU, {rep['threads']} threads"
    p50 = rep["p50_ms"]
    best = p50[f"fastenc {rep['best']}"]
    return (f"speed ({where}, p50 of {rep['calls']} interleaved calls): transformers eager "
            f"{p50['transformers eager']:.1f} ms, SDPA {p50['transformers sdpa']:.1f} ms; fastenc [{rep['best']}] "
            f"{best:.1f} ms = {rep['speedup_vs_sdpa']:.2f}x SDPA, {rep['speedup_vs_eager']:.2f}x eager")  # fmt: skip

"""The demo's speed line: transformers (eager, SDPA) against fastenc's best backend on this machine, measured here
(`fastenc demo` prints it; `speed_report` returns the figures)."""

from __future__ import annotations

import torch

from ..errors import InputError


def speed_report(model, inputs: dict, *, fast=None, calls: int = 20, warmup: int = 2) -> dict:
    """transformers (eager and SDPA attention) against fastenc's best backend here, on the same model and inputs:
    ONNX Runtime on a CPU (when installed; the torch backend otherwise), the fused model `fast` and the same with CUDA
    graphs on a GPU (the faster of the two is reported). Timing is interleaved (each round calls every competitor
    once) and reported as the p50 over `calls` rounds; the fastenc backend is named from what `fastenc.trace()`
    recorded in a traced call, not assumed."""
    import statistics
    import time

    from .._dispatch import onnxruntime_installed
    from .._trace import trace
    from ..optimize import optimize
    from ..runtime import SESSION_CONFIG

    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
        raise InputError(f"calls must be an int >= 1, got {calls!r}")
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
            with torch.inference_mode(), trace() as t:
                m(**inputs)  # first call: exports / captures / compiles outside the timing
                m(**inputs)
            backends = sorted({key.split(".", 1)[0] for key in t.counts if not key.endswith(".export")})
            label = "+".join(backends) or "?"
            if getattr(m, "_fastenc_graphs", None) is not None:
                label += " + CUDA graphs"
            names.append(label)

            def run(m=m):
                with torch.inference_mode():
                    return m(**inputs)

            competitors[f"fastenc {label}#{k}"] = run
        for fn in competitors.values():
            for _ in range(warmup):
                fn()
        samples = {k: [] for k in competitors}
        for _ in range(calls):
            for k, fn in competitors.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                samples[k].append((time.perf_counter() - t0) * 1e3)
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

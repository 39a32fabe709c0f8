"""Phase attention: fastenc.ops.attention against SDPA's flash / memory-efficient / cuDNN backends and a
torch.compile'd eager attention at encoder shapes, through bench/bench_attention.py's run_case: TFLOP/s, raw
samples (interleaved across competitors), speedups, error against fp32. Each case's rows are written as it ends."""

from __future__ import annotations

from .common import Phase, Step, fmt, md_table

# row name -> bench_attention provider
COMPETITORS = {
    "fastenc-triton": "fastenc",
    "fastenc-cuda": "cuda",
    "sdpa-flash": "sdpa-flash",
    "sdpa-efficient": "sdpa-efficient",
    "sdpa-cudnn": "sdpa-cudnn",
    "compile": "compile",
}
DTYPE = "fp16"
DRY = {"H": 2, "S": {77: 17, 257: 33, 512: 40}, "D": 16}  # the dry run's tiny shapes (B 2 if padded)


def _step(name, s, d, h, *, causal=False, pad=False, relbias=False, model="", est=6.0, dry=False):
    spec = dict(S=s, D=d, H=h, causal=causal, padding=pad, relbias=relbias, model=model, batches=(1, 64))
    return Step(name, est, 2.0, spec, dry)


# the model shapes (each a new autotune key: compile time dominates); odd head dims 72 / 80 / 128 among them. The rest
# of the seq x head-dim grid runs with bench/bench_attention.py in a second call when a lease has the time.
STEPS = (
    _step("s77-d64-causal-pad", 77, 64, 12, causal=True, pad=True, model="CLIP ViT-L/14 text", est=8, dry=True),
    _step("s257-d64", 257, 64, 16, model="CLIP ViT-L/14 vision", dry=True),
    _step("s577-d64", 577, 64, 16, model="CLIP ViT-L/14@336 vision"),
    _step("s729-d72", 729, 72, 16, model="SigLIP So400M/14@384 vision"),
    _step("s257-d80", 257, 80, 16, model="ViT-H/14 vision"),
    _step("s512-d64-t5-relbias", 512, 64, 64, relbias=True, model="T5-XXL encoder (relative bias)", est=8, dry=True),
    _step("s257-d128", 257, 128, 8, model="head dim 128"),
)


def cases(spec: dict, dtype, dry: bool):
    """The bench_attention Cases of one step: batches 1 and 64 at the model shape (dry: one tiny batch)."""
    import bench_attention as ba

    seq, d, h, batches = spec["S"], spec["D"], spec["H"], spec["batches"]
    if dry:
        seq, d, h = DRY["S"].get(seq, 24), DRY["D"], DRY["H"]
        batches = (2,) if spec["padding"] else (1,)
    for b in batches:
        yield ba.Case(b, h, seq, d, dtype, causal=spec["causal"], padding=spec["padding"], relbias=spec["relbias"],
                      model=spec["model"])  # fmt: skip


def run(s) -> None:
    torch = s.setup_torch()
    import bench_attention as ba

    from fastenc.benchmark.timing import Timer

    # the interpreter and the CPU run fp32 (fp16 matmuls are slow or missing there)
    dtype = torch.float32 if s.dry else {"fp16": torch.float16, "bf16": torch.bfloat16}[DTYPE]
    iters, warmup = (1, 0) if s.dry else (40, 3)
    measure = ba.interleaved(Timer(s.device, flush_l2=not s.dry), iters)
    compiled = ba.compiled_attention(s.dry)

    def run_step(s, step):
        for case in cases(step.spec, dtype, s.dry):
            for row in ba.run_case(case, COMPETITORS, measure, device=s.device, warmup=warmup, compiled=compiled,
                                   tuned=not s.dry):  # fmt: skip
                s.row("attention", **row)

    s.run_steps(run_step)


def _cell(r: dict | None, fast: dict) -> str:
    if r is None:
        return "-"
    if r.get("status") != "ok":
        return r.get("status", "?")
    x = r["p50_ms"] / fast["p50_ms"] if fast.get("status") == "ok" and r["competitor"] != "fastenc-triton" else None
    return f"{r['p50_ms'] * 1e3:.1f} / {r['tflops']:.1f}" + (f" ({fmt(x, '.2f')}x)" if x else "")


def summary(rows: list[dict]) -> list[str]:
    """One line per case, one column per competitor: p50 us / TFLOP/s (x fastenc-triton)."""
    cases_: dict[tuple, dict] = {}
    for r in rows:
        if r.get("kind") == "attention":
            c = r["config"]
            key = (c["S"], c["D"], c["H"], c["B"], c["causal"], c["padding"], c["relbias"], c["dtype"])
            cases_.setdefault(key, {})[r["competitor"]] = r
    if not cases_:
        return []
    table = []
    for (sq, d, h, b, causal, pad, rel, dt), group in cases_.items():
        mask = "+".join(x for x, on in (("causal", causal), ("pad", pad), ("relbias", rel)) if on) or "-"
        fast = group.get("fastenc-triton", {})
        table.append([f"B{b} H{h} S{sq} D{d}", mask, dt, *(_cell(group.get(n), fast) for n in COMPETITORS)])
    title = "## Attention (p50 us, TFLOP/s at p50; x = competitor p50 / fastenc-triton p50)"
    return [title, ""] + md_table(["case", "mask", "dtype", *COMPETITORS], table) + [""]


PHASE = Phase(
    "attention",
    "attention op vs SDPA flash / efficient / cuDNN and torch.compile, encoder shapes",
    100,
    STEPS,
    run,
    summary,
)

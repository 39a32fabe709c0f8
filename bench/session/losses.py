"""Phase losses: fastenc CLIP loss fp16 and SigLIP loss bf16 at N=65536, d=1024, forward + backward: time and peak
memory, against the materialised (open_clip-style) loss at the largest N that fits (bench/bench_contrastive.py's
make_step and flops)."""

from __future__ import annotations

import time

from .common import Phase, Step, fmt, section, short

N, D = 65536, 1024
DRY_N, DRY_D = 32, 16
STEPS = (  # one dtype per loss (the kernels are the same code for fp16 / bf16)
    Step("clip-fp16", 9, 3.0, dict(loss="clip", dtype="fp16"), dry=True),
    Step("siglip-bf16", 9, 3.0, dict(loss="siglip", dtype="bf16"), dry=True),
)


def run(s) -> None:
    torch = s.setup_torch()
    import bench_contrastive as bc

    from fastenc.benchmark.timing import MemoryMeter, Timer, summarize

    timer = Timer(s.device, flush_l2=False)
    meter = MemoryMeter(s.device)
    n_full, d = (DRY_N, DRY_D) if s.dry else (N, D)
    iters, warmup = (1, 0) if s.dry else (5, 1)
    smallest = DRY_N // 4 if s.dry else 4096

    def measure(loss, provider, n, dtype, dname) -> dict:
        row = dict(loss=loss, provider=provider, config=dict(N=n, d=d, dtype=dname), flops=bc.flops(n, d))
        step = forward = ref = None
        try:
            torch.manual_seed(0)  # the same features for both providers at one N: their loss values must agree
            step, forward, ref = bc.make_step(provider, loss, n, d, dtype, device=s.device)
            meter.start()
            t0 = time.perf_counter()
            step()
            timer.sync()
            first = time.perf_counter() - t0
            for _ in range(warmup):
                step()
            samples = timer.samples(step, iters)
            mem = meter.stop()
            st = summarize(samples)
            value = forward().item()
            row.update(
                status="ok",
                first_call_s=first,
                samples_ms=samples,
                **st,
                **mem,
                loss_value=value,
                tflops=row["flops"] / (st["p50_ms"] * 1e-3) / 1e12,
            )
        except Exception as e:  # noqa: BLE001
            oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
            row.update(status="oom" if oom else "error", reason=short(e, 300))
        finally:
            step = forward = ref = None  # noqa: F841
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
        return row

    def run_step(s, step):
        loss, dname = step.spec["loss"], step.spec["dtype"]
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dname]
        if s.dry:
            dtype, dname = torch.float32, "fp32"  # fp16 matmuls on the CPU are slow or missing; this proves the wiring
        s.row("loss", **measure(loss, "fastenc", n_full, dtype, dname))
        n, status = n_full, None
        while n >= smallest:  # the materialised loss at the largest N that fits
            status = s.row("loss", **measure(loss, "reference", n, dtype, dname))["status"]
            if status != "oom":
                break
            n //= 2
        if n != n_full and status == "ok":  # fastenc at the reference's N too, for a like-for-like ratio
            s.row("loss", **measure(loss, "fastenc", n, dtype, dname))

    s.run_steps(run_step)


COLUMNS = (
    ("loss", lambda r: r["loss"]),
    ("dtype", lambda r: r["config"]["dtype"]),
    ("N", lambda r: str(r["config"]["N"])),
    ("d", lambda r: str(r["config"]["d"])),
    ("provider", lambda r: r["provider"]),
    ("status", lambda r: r["status"]),
    ("p50 ms", lambda r: fmt(r.get("p50_ms"))),
    ("TFLOP/s", lambda r: fmt(r.get("tflops"), ".1f")),
    ("peak MiB", lambda r: fmt(r.get("peak_mem_delta_mb"), ".0f")),
)


def summary(rows: list[dict]) -> list[str]:
    loss = [r for r in rows if r.get("kind") == "loss"]
    return section("Losses (forward + backward; peak = growth over the inputs)", loss, COLUMNS)


def failures(rows: list[dict]) -> list[dict]:
    """fastenc's loss rows that are not ok (an OOM included)."""
    return [r for r in rows if r.get("kind") == "loss" and r.get("provider") == "fastenc" and r.get("status") != "ok"]


PHASE = Phase(
    "losses",
    f"CLIP / SigLIP loss N={N} d={D} fp16/bf16 fwd+bwd vs materialised",
    60,
    STEPS,
    run,
    summary,
    failures,
)

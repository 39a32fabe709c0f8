"""Phase training: bench/bench_training.py's measure, one optimizer step of CLIP ViT-B/16 (both towers + contrastive
loss, b128 bf16) and a T5-XL 2-block encoder stack, fastenc vs transformers SDPA + open_clip's materialised loss:
samples/s or tokens/s, peak memory, speedup and memory ratio."""

from __future__ import annotations

from .common import Phase, Step, fmt, section

# bench/bench_training.py: one optimizer step (forward + backward + AdamW), fastenc vs transformers SDPA; the first
# step compiles / autotunes the backward kernels (untimed); then warm-up + timed steps
STEPS = (
    Step("clip-b16-b128-bf16", 38, 2, dict(case="clip", batch=128, dtype="bf16")),
    Step("t5-xl-2l-b8-s256-bf16", 14, 2, dict(case="t5", layers=2, batch=8, seq=256, dtype="bf16")),
)
DRY = dict(batch=8, layers=2, t5_batch=2, seq=16, dtype="fp32")


def run(s) -> None:
    """bench_training.measure for both providers per step: rows "training" (samples/s or tokens/s, peak memory,
    the first step's loss and fastenc.trace() counts; the fastenc row carries the ratios to transformers)."""
    s.setup_torch(load_cuda_ops=False)
    import bench_training as bt

    iters, warmup = (1, 0) if s.dry else (5, 1)

    def run_step(s, step):
        spec, dry = step.spec, DRY
        rows = []
        for provider in bt.PROVIDERS:
            if spec["case"] == "clip":
                batch, dtype = (dry["batch"], dry["dtype"]) if s.dry else (spec["batch"], spec["dtype"])

                def build(p=provider, batch=batch, dtype=dtype):
                    return bt.clip_case(p, tiny=s.dry, batch=batch, dtype=dtype, device=s.device)
            else:
                shape = (dry["layers"], dry["t5_batch"], dry["seq"], dry["dtype"]) if s.dry else (
                    spec["layers"], spec["batch"], spec["seq"], spec["dtype"])  # fmt: skip

                def build(p=provider, shape=shape):
                    layers, batch, seq, dtype = shape
                    return bt.t5_case(p, tiny=s.dry, layers=layers, batch=batch, seq=seq, dtype=dtype, device=s.device)

            rows.append(bt.measure(spec["case"], provider, build, device=s.device, iters=iters, warmup=warmup))
        bt.add_ratios(rows)
        for r in rows:
            s.row("training", **r)

    s.run_steps(run_step)


COLUMNS = (
    ("case", lambda r: (r.get("config") or {}).get("model", r["case"])),
    ("provider", lambda r: r["provider"]),
    ("status", lambda r: r["status"]),
    ("p50 ms", lambda r: fmt(r.get("p50_ms"), ".1f")),
    ("samples/s or tokens/s", lambda r: fmt(r.get("samples_per_s") or r.get("tokens_per_s"), ".0f")),
    ("peak MiB", lambda r: fmt(r.get("peak_mem_mb"), ".0f")),
    ("speedup", lambda r: fmt(r.get("speedup_vs_transformers"), ".2f")),
    ("mem ratio", lambda r: fmt(r.get("mem_ratio_vs_transformers"), ".2f")),
)


def summary(rows: list[dict]) -> list[str]:
    train = [r for r in rows if r.get("kind") == "training"]
    title = "Training (bench/bench_training.py; goal: CLIP B/16 >= 1.3x transformers at <= its memory)"
    return section(title, train, COLUMNS)


PHASE = Phase(
    "training",
    "one training step: CLIP ViT-B/16 b128 + loss, T5-XL 2 blocks; fastenc vs transformers SDPA + open_clip loss",
    90,
    STEPS,
    run,
    summary,
)

"""Phase embed: bench/bench_embed.py's run at ViT-L/14 b256 fp16 on synthetic JPEGs: model-only vs the fastenc embed
pipeline (busy share) vs a transformers + DataLoader loop, samples/s."""

from __future__ import annotations

import tempfile

from .common import Phase, Step, fmt, section

# fastenc embed (bench/bench_embed.py): ViT-L/14 b256 fp16 on synthetic 320x240 JPEGs, model-only vs the whole
# pipeline vs transformers + DataLoader; the estimate counts building + saving ViT-L (random weights) and 2048 JPEGs
# (8 batches of 256 per pass)
STEPS = (Step("vit-l14-b256-fp16", 40, 4, dict(shape="ViT-L/14", images=2048, batch=256, dtype="fp16", iters=10)),)
DRY = dict(shape="tiny", images=48, batch=16, dtype="fp32", iters=1)


def run(s) -> None:
    """bench_embed.run in this child: rows "embed" (provider model-only / fastenc / hf-model-only / baseline)."""
    s.setup_torch(load_cuda_ops=False)
    import bench_embed as be

    def run_step(s, step):
        spec = dict(DRY if s.dry else step.spec)
        argv = ["--shape", spec["shape"], "--images", str(spec["images"]), "--batch", str(spec["batch"]),
                "--dtype", spec["dtype"], "--iters", str(spec["iters"]), "--device", str(s.device)]  # fmt: skip
        if s.dry:
            argv += ["--workers", "1"]
        with tempfile.TemporaryDirectory(prefix="gs-embed-") as work:
            be.run(be.parser().parse_args([*argv, "--work", work]), sink=lambda row: s.row("embed", status="ok", **row))

    s.run_steps(run_step)


COLUMNS = (
    ("shape", lambda r: r["shape"]),
    ("batch", lambda r: str(r["batch"])),
    ("dtype", lambda r: r["dtype"]),
    ("workers", lambda r: str(r["workers"])),
    ("provider", lambda r: r["provider"]),
    ("samples/s", lambda r: fmt(r.get("samples_per_s"), ".0f")),
    ("pipeline / model-only", lambda r: fmt(r.get("pipeline_over_model_only"), ".2f")),
    ("model busy", lambda r: fmt(r.get("model_busy"), ".2f")),
)


def summary(rows: list[dict]) -> list[str]:
    emb = [r for r in rows if r.get("kind") == "embed"]
    return section("Embedding pipeline (bench/bench_embed.py; clip-retrieval: 312 samples/s per A100)", emb, COLUMNS)


PHASE = Phase(
    "embed",
    "fastenc embed pipeline: ViT-L/14 b256 fp16 model-only vs pipeline vs transformers + DataLoader",
    90,
    STEPS,
    run,
    summary,
)

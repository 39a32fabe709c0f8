"""One training step, fastenc against transformers SDPA: CLIP ViT-B/16 contrastive (both towers + loss + AdamW) and a
T5-XL encoder block stack (forward + backward + AdamW).

    python bench/bench_training.py                                   # CUDA: CLIP B/16 batch 256 bf16, T5-XL 4 layers
    python bench/bench_training.py --clip-batch 128 --t5-layers 2 --out training.json
    python bench/bench_training.py --tiny --out training_cpu.json    # CPU wiring check (tiny; timings mean nothing)

Providers (same random weights, same batch, same optimizer settings):
  transformers  the transformers model with attn_implementation="sdpa"; CLIP: torch.autocast (fp32 weights) and the
                open_clip-style materialised loss (N x N logits in the autocast dtype, cross-entropy both ways) -
                fastenc.train.ContrastiveTrainer(fused=False, loss_impl="materialised", amp="autocast")
  fastenc       fastenc.optimize(model) in train() mode (fused forward, the ops' backward) and fastenc.ops.clip_loss
                (tiled, no N x N logits); CLIP: master weights (bf16 towers, fp32 AdamW masters) -
                ContrastiveTrainer(fused=True, amp="auto"). Backend "auto" on CUDA; on CPU "torch" (the Triton
                interpreter would time Python, not kernels).
T5: the model in the bench dtype (bf16 weights for both, AdamW on them), dropout 0, loss = mean(last_hidden^2) in
fp32; tokens/s = B * S / step time.

Each row: p50 / p90 of one optimizer step (Timer: CUDA events, L2 flushed, after warm-up), samples/s (CLIP) or
tokens/s (T5), peak memory over the row (MemoryMeter: torch.cuda.max_memory_allocated; CPU: RSS high-water mark)
with weights, gradients and optimizer state included, the first step's loss (both providers start from the same
weights, so it must agree to the dtype's precision) and fastenc.trace() counts of one step (what ran fused, what fell
back). Rows are appended to a JSON list under bench/results/ with --out.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch
from _common import save_results

PROVIDERS = ("transformers", "fastenc")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
T5_XL = dict(d_model=2048, d_kv=64, num_heads=32, d_ff=5120)  # google/t5-v1_1-xl (fastenc.benchmark.matrix)
T5_TINY = dict(d_model=64, d_kv=32, num_heads=2, d_ff=128)


def _meta(device: torch.device) -> dict:
    import platform

    import transformers
    import triton
    from _common import git_commit

    import fastenc

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "fastenc": fastenc.__version__,
        "commit": git_commit(dirty=False, cwd=None),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- cases


def clip_case(provider: str, *, tiny: bool, batch: int, dtype: str, device: torch.device, seed: int = 0):
    """(step, trace_step, config): one contrastive optimizer step of CLIP ViT-B/16 (or the tiny CLIP)."""
    from transformers import CLIPModel

    from fastenc.models.configs import clip_config
    from fastenc.train import ContrastiveTrainer, FinetuneConfig, SyntheticPairs, collate

    torch.manual_seed(seed)
    shape = "tiny" if tiny else "ViT-B/16"
    with device:  # random init on the device itself (CPU init of 150M parameters costs seconds of a GPU lease)
        model = CLIPModel._from_config(clip_config(shape), attn_implementation="sdpa")
    fused = provider == "fastenc"
    cfg = FinetuneConfig(
        tiny="clip",
        batch_size=batch,
        lr=1e-7,  # the weights barely move: every timed step does the same work on the same data
        precision=dtype,
        fused=fused,
        loss_impl="fastenc" if fused else "materialised",
        amp="auto" if fused else "autocast",
        backend="auto" if device.type == "cuda" else "torch",
    )
    trainer = ContrastiveTrainer(model, cfg, device)
    c = model.config
    ds = SyntheticPairs(
        batch,
        image_size=c.vision_config.image_size,
        seq_len=c.text_config.max_position_embeddings,
        vocab_size=c.text_config.vocab_size,
        eos_token_id=c.text_config.eos_token_id,
        seed=seed,
    )
    data = {k: v.to(device) for k, v in collate([ds[i] for i in range(batch)]).items()}
    config = dict(
        model=f"CLIP {shape}",
        batch=batch,
        dtype=dtype,
        amp=trainer.amp,
        loss="fastenc.ops.clip_loss" if fused else "materialised (open_clip)",
        backend=cfg.backend if fused else "transformers sdpa",
        seq=c.text_config.max_position_embeddings,
        image=c.vision_config.image_size,
    )
    return (lambda: trainer.step([data])), config, batch


def t5_case(provider: str, *, tiny: bool, layers: int, batch: int, seq: int, dtype: str, device, seed: int = 0):
    """(step, config, tokens): forward + backward + AdamW of a T5-v1.1-XL encoder stack of `layers` blocks."""
    from transformers import T5Config, T5EncoderModel

    import fastenc

    torch.manual_seed(seed)
    dims = T5_TINY if tiny else T5_XL
    cfg = T5Config(
        vocab_size=1000 if tiny else 32128,
        num_layers=layers,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,  # fastenc runs transformers' forward for dropout > 0 in train mode
        **dims,
    )
    with device:
        model = T5EncoderModel._from_config(cfg, attn_implementation="sdpa")
    model = model.to(device=device, dtype=DTYPES[dtype]).train()
    runner = (
        fastenc.optimize(model, backend="auto" if device.type == "cuda" else "torch")
        if provider == "fastenc"
        else model
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab_size, (batch, seq), generator=g).to(device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)

    def step():
        out = runner(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, S, D)
        loss = out.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    config = dict(
        model=f"T5-v1.1-{'tiny' if tiny else 'XL'} encoder, {layers} layers",
        batch=batch,
        seq=seq,
        dtype=dtype,
        backend="transformers sdpa" if provider == "transformers" else "fastenc",
    )
    return step, config, batch * seq


def measure(case: str, provider: str, build, *, device, iters: int, warmup: int) -> dict:
    """Build the provider's model (inside the memory window), time `iters` steps after `warmup`; one row."""
    import fastenc
    from fastenc.benchmark.rows import make_row, set_samples
    from fastenc.benchmark.timing import MemoryMeter, Timer, summarize

    versions = {"torch": torch.__version__, "fastenc": fastenc.__version__}
    row = make_row("bench_training", case, provider, mode="train-step", device=str(device), versions=versions)
    del row["commit"]  # the caller's: main's run metadata, or the GPU session's row
    row.update(bench="training", case=case, provider=provider)
    timer = Timer(device, flush_l2=device.type == "cuda")
    meter = MemoryMeter(device, timer.held_bytes)
    step = None
    try:
        meter.start()
        step, config, units = build()
        row.update(config=config, dtype=config.get("dtype"))
        t0 = time.perf_counter()
        with fastenc.trace() as t:
            loss = step()
        timer.sync()
        row["first_call_s"] = time.perf_counter() - t0
        row["loss_first"] = loss
        row["trace"] = dict(t.counts)
        row["fallbacks"] = [f"{f.op}: {f.requested} -> {f.ran} ({f.reason})" for f in t.fallbacks]
        for _ in range(warmup):
            step()
        samples = timer.samples(step, iters)
        st = summarize(samples)
        unit = "samples_per_s" if case == "clip" else "tokens_per_s"
        set_samples(row, samples)
        row.update(status="ok", iters=iters, **st, **meter.stop(), timer=timer.name)
        row[unit] = units / (st["p50_ms"] * 1e-3)
    except Exception as e:  # noqa: BLE001 - a provider that fails (OOM, unsupported) is a row with the reason
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        row.update(status="oom" if oom else "error", reason=f"{type(e).__name__}: {e}"[:400])
        row["notes"] = row["reason"]
    finally:
        step = None  # noqa: F841
        _free(device)
    return row


def add_ratios(rows: list[dict]) -> None:
    """fastenc rows get speedup (fastenc / transformers throughput) and mem_ratio (peak / peak), same case."""
    by = {(r["case"], r["provider"]): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        base = by.get((r["case"], "transformers"))
        if r["provider"] != "fastenc" or r.get("status") != "ok" or base is None:
            continue
        unit = "samples_per_s" if r["case"] == "clip" else "tokens_per_s"
        r["speedup_vs_transformers"] = r[unit] / base[unit]
        if r.get("peak_mem_mb") and base.get("peak_mem_mb"):
            r["mem_ratio_vs_transformers"] = r["peak_mem_mb"] / base["peak_mem_mb"]


def run(args, device: torch.device) -> list[dict]:
    rows = []
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for case in cases:
        for provider in args.providers.split(","):
            if case == "clip":

                def build(p=provider):
                    return clip_case(p, tiny=args.tiny, batch=args.clip_batch, dtype=args.dtype, device=device)
            else:

                def build(p=provider):
                    return t5_case(
                        p,
                        tiny=args.tiny,
                        layers=args.t5_layers,
                        batch=args.t5_batch,
                        seq=args.t5_seq,
                        dtype=args.dtype,
                        device=device,
                    )

            row = measure(case, provider, build, device=device, iters=args.iters, warmup=args.warmup)
            rows.append(row)
            rate = row.get("samples_per_s") or row.get("tokens_per_s")
            what = "samples/s" if case == "clip" else "tokens/s"
            print(
                f"{case:5} {provider:13} {row['status']:6} "
                + (
                    f"p50 {row['p50_ms']:9.2f} ms  {rate:10.1f} {what}  peak {row.get('peak_mem_mb') or 0:9.1f} MiB"
                    f"  loss {row['loss_first']:.4f}"
                    if row["status"] == "ok"
                    else row.get("reason", "")
                )
            )
    add_ratios(rows)
    for r in rows:
        if "speedup_vs_transformers" in r:
            print(
                f"{r['case']}: fastenc {r['speedup_vs_transformers']:.2f}x transformers throughput, "
                f"peak memory {r.get('mem_ratio_vs_transformers', float('nan')):.2f}x"
            )
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models (CPU wiring check)")
    p.add_argument("--cases", default="clip,t5", help="comma list: clip, t5")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--clip-batch", type=int, default=None, help="default 256 (tiny: 8)")
    p.add_argument("--t5-layers", type=int, default=None, help="default 4 (tiny: 2)")
    p.add_argument("--t5-batch", type=int, default=None, help="default 8 (tiny: 2)")
    p.add_argument("--t5-seq", type=int, default=None, help="default 256 (tiny: 16)")
    p.add_argument("--iters", type=int, default=None, help="timed steps (default 10; tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (default 2; tiny 0)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", help="append rows to this JSON list (a bare name goes under bench/results/)")
    return p


def fill_defaults(args) -> None:
    tiny = args.tiny
    for name, real, small in (
        ("clip_batch", 256, 8),
        ("t5_layers", 4, 2),
        ("t5_batch", 8, 2),
        ("t5_seq", 256, 16),
        ("iters", 10, 2),
        ("warmup", 2, 0),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else real)


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    fill_defaults(args)
    unknown = set(args.providers.split(",")) - set(PROVIDERS) or set(args.cases.split(",")) - {"clip", "t5"}
    if unknown:
        p.error(f"unknown providers / cases {sorted(unknown)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    elif not args.tiny:
        print("bench_training: no CUDA device; use --tiny for the CPU wiring check", file=sys.stderr)
        return 2
    if args.dtype is None:
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    meta = _meta(device)
    print(f"# {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  commit {meta['commit']}")
    rows = run(args, device)
    for r in rows:
        r.update(meta)  # device name and commit of the run; versions below
        r["versions"].update({k: meta[k] for k in ("torch", "triton", "transformers", "fastenc")})
    if args.out:
        save_results(args.out, rows)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

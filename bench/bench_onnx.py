"""ONNX Runtime (CPU) vs eager PyTorch on this machine's CPU, for exported CLIP text / vision towers and a T5 encoder.

    python bench/bench_onnx.py --out onnx_cpu.json                                 # the committed run (idle machine)
    python bench/bench_onnx.py --threads 2 --out onnx_runtime_cpu.json              # fastenc ORT / int8 vs transformers
    python bench/bench_onnx.py --clip-shape tiny --t5-shape t5-tiny --iters 5 --batch 1 --out /tmp/smoke.json

Providers, same random-weight model (fastenc.models.configs shapes; nothing downloaded), same inputs:
    torch-eager  transformers with attn_implementation="eager"
    torch-sdpa   transformers with attn_implementation="sdpa"
    ort          fastenc.export.to_onnx graph (plain ONNX ops), ONNX Runtime CPUExecutionProvider
    ort-opt      the same export with ORT's transformer fusions (optimize=True)
    fastenc-ort  fastenc.optimize(model, backend="onnxruntime"): the drop-in module (export cache, IO binding,
                 argument checks, the per-call weight check) returning transformers' ModelOutput
    fastenc-ort-int8  the same with quantize="int8-dynamic"
Timing is interleaved: after --warmup calls of each provider, each of the --iters rounds calls every provider once
(time.perf_counter around one call), so load from other processes hits all providers alike and the ratios of one
run are comparable even on a shared machine. Per row: p50 / p90 latency, the raw samples, `speedup_vs_sdpa`
(torch-sdpa p50 / this p50, same run), the max relative error of the provider's first output against torch-eager,
for every provider the min cosine of its pooled embedding (first output; T5: masked mean of last_hidden_state)
against torch-eager's, the CPU model (from /proc/cpuinfo), thread count, versions and git commit. Rows are appended
to --out (a bare file name goes to bench/results/). Runs without a GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, append_rows, git_commit, model_row

from fastenc.benchmark.timing import Timer, percentile

PROVIDERS = ("torch-eager", "torch-sdpa", "ort", "ort-opt", "fastenc-ort", "fastenc-ort-int8")
T5_SHAPES = {  # d_model, d_kv, heads, d_ff, layers (default), vocab
    "t5-tiny": (32, 16, 2, 64, 2, 1000),
    "t5-base": (768, 64, 12, 2048, 12, 32128),
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def meta(threads: int) -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {
        "device": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_at_start": os.getloadavg()[0],  # other jobs on the machine: compare ratios of one run
    }


def build_models(args):
    """[(label, model, config dict, [(batch, seq)...])] for the requested towers."""
    import torch
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection, T5Config, T5EncoderModel

    from fastenc.models.configs import clip_config

    out = []
    torch.manual_seed(0)
    if {"clip-text", "clip-vision"} & set(args.models):
        cfg = clip_config(args.clip_shape, layers=args.clip_layers)
        text_cfg, vision_cfg = cfg.text_config, cfg.vision_config
        text_cfg.projection_dim = vision_cfg.projection_dim = cfg.projection_dim
        info = {"shape": args.clip_shape, "layers": args.clip_layers or "full"}
        if "clip-text" in args.models:
            seq = args.clip_seq or text_cfg.max_position_embeddings
            out.append(("clip-text", CLIPTextModelWithProjection(text_cfg), info, [(b, seq) for b in args.batch]))
        if "clip-vision" in args.models:
            out.append(("clip-vision", CLIPVisionModelWithProjection(vision_cfg), info, [(b, 0) for b in args.batch]))
    if "t5" in args.models:
        d, dkv, h, ff, n, vocab = T5_SHAPES[args.t5_shape]
        layers = args.t5_layers or n
        cfg = T5Config(vocab_size=vocab, d_model=d, d_kv=dkv, num_heads=h, d_ff=ff, num_layers=layers,
                       feed_forward_proj="gated-gelu")  # fmt: skip
        info = {"shape": args.t5_shape, "layers": layers}
        out.append(("t5-encoder", T5EncoderModel(cfg), info, [(b, args.t5_seq) for b in args.batch]))
    return [(label, m.eval(), info, sizes) for label, m, info, sizes in out]


def cpu_timer():
    """fastenc.benchmark.timing.Timer on the CPU: perf_counter around each call."""
    import torch

    return Timer(torch.device("cpu"))


def time_interleaved(calls: dict, warmup: int, iters: int) -> dict[str, list[float]]:
    """provider -> ms per call; every round calls each provider once (see the module docstring)."""
    timer = cpu_timer()
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in calls}
    for _ in range(iters):
        for k, fn in calls.items():
            samples[k].append(timer.once(fn))
    return samples


def time_blocks(calls: dict, warmup: int, iters: int) -> dict[str, list[float]]:
    """provider -> ms per call; each provider's warm-up and --iters calls back to back (with ORT's spinning on, the
    fair order: no torch call runs between two ORT calls while ORT's threads spin-wait)."""
    timer = cpu_timer()
    samples = {}
    for k, fn in calls.items():
        for _ in range(warmup):
            fn()
        samples[k] = timer.samples(fn, iters)
    return samples


def pooled(label: str, out, mask):
    """(N, D) pooled embedding: the first output, or for T5 the masked mean of last_hidden_state."""
    import torch

    x = torch.as_tensor(out).float()
    if label == "t5-encoder":
        m = mask.float()[..., None]
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)
    return x.reshape(x.shape[0], -1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=["clip-text", "clip-vision", "t5"], default=["clip-text",
                   "clip-vision", "t5"])  # fmt: skip
    p.add_argument("--clip-shape", default="ViT-B/32")
    p.add_argument("--clip-layers", type=int, default=None, help="reduce both CLIP towers to N layers (labelled)")
    p.add_argument("--clip-seq", type=int, default=None, help="CLIP text length (default: 77, the position limit)")
    p.add_argument("--t5-shape", choices=sorted(T5_SHAPES), default="t5-base")
    p.add_argument("--t5-layers", type=int, default=4, help="T5 encoder depth (default 4 of t5-base's 12: labelled)")
    p.add_argument("--t5-seq", type=int, default=128)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--threads", type=int, default=None, help="torch and ORT intra-op threads (default: all cores)")
    p.add_argument("--t5-mask", action="store_true", help="T5 with attention_mask (padded rows)")
    p.add_argument("--ort-spinning", action="store_true", help="leave ORT's thread spinning on (its default; fast on "
                   "a quiet machine, but spinning threads slow the interleaved torch calls under load)")  # fmt: skip
    p.add_argument("--timing", choices=("interleaved", "blocks"), default="interleaved",
                   help="interleaved: every round calls each provider once; blocks: each provider's calls back to back "
                   "(use with --ort-spinning)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", default=None, help="append rows to this JSON file (bare name: bench/results/NAME)")
    args = p.parse_args(argv)

    import numpy as np
    import onnxruntime as ort
    import torch

    import fastenc
    from fastenc.export import export_onnx
    from fastenc.export.towers import tower_of

    threads = args.threads or os.cpu_count() or 1
    # Interleaved timing: ORT's idle threads would spin-wait after each ORT call and starve the torch call that follows
    # (measured: transformers 20-40x slower); every ORT session here blocks instead (ORT's own latency pays for it).
    from fastenc import runtime

    spin = "1" if args.ort_spinning else "0"
    runtime.SESSION_CONFIG["session.intra_op.allow_spinning"] = spin
    torch.set_num_threads(threads)
    env = meta(threads)
    print(f"# {env['device']}  threads {threads}  torch {env['torch']}  onnxruntime {env['onnxruntime']}  "
          f"commit {env['commit']}")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FASTENC_CACHE"] = str(Path(tmp) / "cache")  # the fastenc providers export into a fresh cache
        for label, model, info, sizes in build_models(args):
            tower = tower_of(model)
            sessions, fast = {}, {}
            for prov in ("ort", "ort-opt"):
                if prov in args.providers:
                    rep = export_onnx(model, Path(tmp) / f"{label}-{prov}.onnx", optimize=prov == "ort-opt")
                    opts = ort.SessionOptions()
                    opts.intra_op_num_threads = threads
                    opts.log_severity_level = 3
                    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
                    sessions[prov] = (ort.InferenceSession(rep.path, opts, providers=["CPUExecutionProvider"]), rep)
            for prov, quant in (("fastenc-ort", None), ("fastenc-ort-int8", "int8-dynamic")):
                if prov in args.providers:
                    fast[prov] = fastenc.optimize(model, backend="onnxruntime", quantize=quant, threads=threads,
                                                  strict=True)  # fmt: skip
            for batch, seq in sizes:
                inputs = tower.make_inputs(batch, seq or 8, seed=batch)
                feed = {k: v.numpy() for k, v in inputs.items()}
                mask = inputs.get("attention_mask", torch.ones(batch, seq or 1, dtype=torch.long))
                model.set_attn_implementation("eager")  # the reference every provider is compared with
                with torch.inference_mode():
                    ref = tower.run(inputs)
                first = next(iter(ref))
                ref0 = ref[first].float().numpy()
                ref_pool = pooled(label, ref[first], mask)
                calls, firsts = {}, {}
                for prov in args.providers:
                    if prov.startswith("torch"):
                        impl = prov.split("-")[1]

                        def call(model=model, inputs=inputs, impl=impl):
                            model.set_attn_implementation(impl)
                            with torch.inference_mode():
                                return model(**inputs)

                        got = call()[first].float().numpy()
                    elif prov.startswith("fastenc"):

                        def call(m=fast[prov], inputs=inputs):
                            with torch.inference_mode():
                                return m(**inputs)

                        with fastenc.trace() as t:
                            got = call()[first].float().numpy()
                        assert t.counts.get("onnxruntime.forward") == 1 and not t.fallbacks, (t.counts, t.fallbacks)
                    else:
                        sess, rep = sessions[prov]
                        names = [o.name for o in sess.get_outputs()]

                        def call(sess=sess, feed=feed):
                            return sess.run(None, feed)  # every output, as torch computes them all

                        got = call()[names.index(first)]
                    calls[prov] = call
                    firsts[prov] = got
                timer = time_interleaved if args.timing == "interleaved" else time_blocks
                samples = timer(calls, args.warmup, args.iters)
                sdpa = percentile(samples["torch-sdpa"], 50) if "torch-sdpa" in samples else None
                for prov in args.providers:
                    got = firsts[prov]
                    err = float(np.abs(got - ref0).max() / max(np.abs(ref0).max(), 1e-12))
                    cos = torch.nn.functional.cosine_similarity(pooled(label, got, mask), ref_pool, dim=-1)
                    p50 = percentile(samples[prov], 50)
                    dtype = "int8-dynamic" if prov.endswith("int8") else "fp32"
                    row = model_row(
                        "bench_onnx",
                        env,
                        label,
                        prov,
                        samples[prov],
                        mode="forward",
                        config={**info, "batch": batch, "seq": seq or None, "dtype": dtype},
                        dtype=dtype,
                        bench="onnx_cpu",
                        model=label,
                        p90_ms=percentile(samples[prov], 90),
                        speedup_vs_sdpa=(sdpa / p50) if sdpa else None,
                        max_rel_err_vs_eager=err,
                        pooled_cosine_min_vs_eager=float(cos.min()),
                        timing=args.timing,
                        ort_spinning=args.ort_spinning,
                    )
                    if prov in sessions:
                        row["fusions"] = sessions[prov][1].fusions
                    if prov == "fastenc-ort-int8":
                        row["quantization"] = fast[prov]._fastenc_ort.encoder.metadata.get("fastenc.quantize")
                    rows.append(row)
                    ratio = f"{row['speedup_vs_sdpa']:5.2f}x sdpa" if sdpa else ""
                    print(f"{label:<12} {prov:<17} b={batch:<3} s={seq or '-':<4} p50 {p50:9.3f} ms  "
                          f"p90 {row['p90_ms']:9.3f} ms  {ratio}  rel err {err:.1e}  cos {float(cos.min()):.6f}",
                          flush=True)  # fmt: skip
    if args.out:
        path = Path(args.out)
        if path.parent == Path("."):
            path = RESULTS / path
        append_rows(path, rows)
        print(f"# appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ONNX Runtime (CPU) vs eager PyTorch on this machine's CPU, for exported CLIP text / vision towers and a T5 encoder.

    python bench/bench_onnx.py --out onnx_cpu.json                                 # the committed run (idle machine)
    python bench/bench_onnx.py --clip-shape tiny --t5-shape t5-tiny --iters 5 --batch 1 --out /tmp/smoke.json

Providers, same random-weight model (fastenc.models.configs shapes; nothing downloaded), same inputs:
    torch-eager  transformers with attn_implementation="eager"
    torch-sdpa   transformers with attn_implementation="sdpa"
    ort          fastenc.export.to_onnx graph (plain ONNX ops), ONNX Runtime CPUExecutionProvider
    ort-opt      the same export with ORT's transformer fusions (optimize=True)
Per row: p50 / p90 latency over --iters timed calls (time.perf_counter around one call, after --warmup calls), the
raw samples, the max relative error of the provider's first output against torch-eager, the CPU model (from
/proc/cpuinfo), thread count, versions and git commit. Rows are appended to --out (a bare file name goes to
bench/results/). Runs without a GPU; timings are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, append_rows, git_commit, percentile

PROVIDERS = ("torch-eager", "torch-sdpa", "ort", "ort-opt")
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


def time_calls(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


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
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", default=None, help="append rows to this JSON file (bare name: bench/results/NAME)")
    args = p.parse_args(argv)

    import numpy as np
    import onnxruntime as ort
    import torch

    from fastenc.export import export_onnx
    from fastenc.export.towers import tower_of

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    env = meta(threads)
    print(f"# {env['device']}  threads {threads}  torch {env['torch']}  onnxruntime {env['onnxruntime']}  "
          f"commit {env['commit']}")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, model, info, sizes in build_models(args):
            tower = tower_of(model)
            sessions = {}
            for prov in ("ort", "ort-opt"):
                if prov in args.providers:
                    rep = export_onnx(model, Path(tmp) / f"{label}-{prov}.onnx", optimize=prov == "ort-opt")
                    opts = ort.SessionOptions()
                    opts.intra_op_num_threads = threads
                    opts.log_severity_level = 3
                    sessions[prov] = (ort.InferenceSession(rep.path, opts, providers=["CPUExecutionProvider"]), rep)
            for batch, seq in sizes:
                inputs = tower.make_inputs(batch, seq or 8, seed=batch)
                feed = {k: v.numpy() for k, v in inputs.items()}
                model.set_attn_implementation("eager")  # the reference every provider is compared with
                with torch.inference_mode():
                    ref = tower.run(inputs)
                first = next(iter(ref))
                ref0 = ref[first].float().numpy()
                for prov in args.providers:
                    if prov.startswith("torch"):
                        model.set_attn_implementation(prov.split("-")[1])

                        def call(model=model, inputs=inputs):
                            with torch.inference_mode():
                                return model(**inputs)

                        got = call()[first].float().numpy()
                    else:
                        sess, rep = sessions[prov]

                        names = [o.name for o in sess.get_outputs()]

                        def call(sess=sess, feed=feed):
                            return sess.run(None, feed)  # every output, as torch computes them all

                        got = call()[names.index(first)]
                    err = float(np.abs(got - ref0).max() / max(np.abs(ref0).max(), 1e-12))
                    samples = time_calls(call, args.warmup, args.iters)
                    row = {
                        "bench": "onnx_cpu",
                        "model": label,
                        "provider": prov,
                        "config": {**info, "batch": batch, "seq": seq or None, "dtype": "fp32"},
                        "p50_ms": percentile(samples, 50),
                        "p90_ms": percentile(samples, 90),
                        "max_rel_err_vs_eager": err,
                        "samples_ms": samples,
                        **env,
                    }
                    if prov.startswith("ort"):
                        row["fusions"] = sessions[prov][1].fusions
                    rows.append(row)
                    print(f"{label:<12} {prov:<12} b={batch:<3} s={seq or '-':<4} p50 {row['p50_ms']:9.3f} ms  "
                          f"p90 {row['p90_ms']:9.3f} ms  rel err {err:.1e}")  # fmt: skip
    if args.out:
        path = Path(args.out)
        if path.parent == Path("."):
            path = RESULTS / path
        append_rows(path, rows)
        print(f"# appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

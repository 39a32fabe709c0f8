"""Host overhead of one encoder forward: the CPU proxy for batch-1 GPU latency.

A 12-layer CLIP text tower of hidden size 32 (compute ~ nil) at b1 x 77 on one CPU thread: what a forward costs
here is Python + dispatcher time, which at batch 1 on a GPU is the latency unless CUDA graphs replay it. Competitors
run interleaved in one process (transformers eager, transformers SDPA, fastenc backend="torch", and
fastenc backend="triton" with every fastenc kernel launch replaced by its fake: the proxy for the GPU's batch-1 host
time of the Triton path, row `fastenc_triton_stub_launches`), median of --iters forwards each. Also counts, per layer,
the ops each one issues: top-level aten ops from torch.profiler (what would be kernel launches on a GPU), fastenc's
own trace counts, and the Python-level calls of one forward (sys.setprofile) divided by the layer count.

    python bench/bench_overhead.py --out overhead_cpu.json            # rows appended to bench/results/overhead_cpu.json
    python bench/bench_overhead.py --real 20 --out overhead_cpu.json  # + CLIP ViT-B/32 text / vision at b1, b8
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _common import RESULTS, append_rows, git_commit

from fastenc.benchmark.rows import make_row
from fastenc.benchmark.timing import Timer, percentile

LAYERS = 12
HIDDEN = 32
SEQ = 77


def build(attn_implementation: str):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_attention_heads=2,
        num_hidden_layers=LAYERS,
        max_position_embeddings=SEQ,
        vocab_size=1000,
        attn_implementation=attn_implementation,
    )
    return CLIPTextModel(cfg).eval()


STUB = "fastenc_triton_stub_launches"  # the triton backend's host path, kernels replaced by their fakes


def stub_triton_launches() -> None:
    """Run every torch.ops.fastenc op's fake as its CPU kernel: same output shapes, dtypes and strides, no Triton
    launch (nor interpreter). What is left of a forward is the host path a GPU pays per call."""
    import torch

    from fastenc.ops import _library

    _library.register_triton_ops()
    for name, fake in _library.fakes().items():
        torch.library.register_kernel(f"{_library.NAMESPACE}::{name}", "cpu", fake)


def competitors(stub: bool = True) -> dict:
    import fastenc

    eager = build("eager")
    sdpa = build("sdpa")
    sdpa.load_state_dict(eager.state_dict())
    out = {
        "transformers_eager": eager,
        "transformers_sdpa": sdpa,
        "fastenc_torch": fastenc.optimize(eager, backend="torch"),
    }
    if stub:
        stub_triton_launches()
        out[STUB] = fastenc.optimize(eager, backend="triton")
    return out


def python_calls_per_forward(model, inputs) -> int:
    """Python-level function calls (sys.setprofile "call" events) of one forward."""
    import torch

    n = [0]

    def prof(frame, event, arg):
        if event == "call":
            n[0] += 1

    with torch.inference_mode():
        sys.setprofile(prof)
        try:
            model(**inputs)
        finally:
            sys.setprofile(None)
    return n[0]


def aten_ops_per_forward(model, inputs) -> int:
    """Top-level aten ops of one forward (ops called from Python or from a composite op's first level)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**inputs)
    events = [e for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
    return len(events)


def real_sizes(iters: int, threads: int, meta: dict) -> list[dict]:
    """CLIP ViT-B/32 text (77 tokens; b8 rows padded to lengths 77..8) and vision at b1 and b8: transformers SDPA vs
    fastenc backend="torch", interleaved, p50 of wall and process CPU time."""
    import torch
    from transformers import CLIPTextModel, CLIPVisionModel

    import fastenc
    from fastenc.models.configs import clip_config

    torch.set_num_threads(threads)
    cfg = clip_config("ViT-B/32")
    cfg.text_config._attn_implementation = cfg.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    towers = {"text": CLIPTextModel(cfg.text_config).eval(), "vision": CLIPVisionModel(cfg.vision_config).eval()}
    rows = []
    timer = Timer(torch.device("cpu"))
    for tower, model in towers.items():
        fast = fastenc.optimize(model, backend="torch")
        for batch in (1, 8):
            if tower == "text":
                ids = torch.randint(0, cfg.text_config.vocab_size - 2, (batch, SEQ))
                mask = torch.ones_like(ids)
                for i in range(1, batch):  # a batch of captions of different lengths, right-padded
                    mask[i, SEQ - 9 * i :] = 0
                inputs = {"input_ids": ids, "attention_mask": mask}
            else:
                inputs = {"pixel_values": torch.randn(batch, 3, 224, 224)}
            wall: dict[str, list[float]] = {"transformers_sdpa": [], "fastenc_torch": []}
            cpu: dict[str, list[float]] = {"transformers_sdpa": [], "fastenc_torch": []}
            with torch.inference_mode():
                for m in (model, fast):
                    m(**inputs)
                for _ in range(iters):
                    for name, m in (("transformers_sdpa", model), ("fastenc_torch", fast)):
                        w, c = timer.once_cpu(lambda: m(**inputs), clock=time.process_time)  # noqa: B023
                        wall[name].append(w)
                        cpu[name].append(c)
            base = percentile(wall["transformers_sdpa"], 50)
            base_cpu = percentile(cpu["transformers_sdpa"], 50)
            for name in wall:
                med, med_cpu = percentile(wall[name], 50), percentile(cpu[name], 50)
                rows.append(
                    _row(
                        {
                            **meta,
                            "model": f"CLIP ViT-B/32 {tower}",
                            "load_avg_1m": os.getloadavg()[0],
                            "batch": batch,
                            "threads": threads,
                        },
                        name,
                        wall[name],
                        cpu[name],
                        ratio_vs_sdpa=med / base,
                        cpu_p50_ms=med_cpu,
                        cpu_ratio_vs_sdpa=med_cpu / base_cpu,
                    )
                )
                print(
                    f"CLIP ViT-B/32 {tower:6} b{batch}  {name:18} p50 {med:8.2f} ms ({med / base:4.2f}x)  "
                    f"cpu {med_cpu:8.2f} ms ({med_cpu / base_cpu:4.2f}x)"
                )
    return rows


def main(argv=None) -> int:
    import torch

    import fastenc

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=200, help="timed forwards per competitor (median reported)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--out", help="file name under bench/results/ to append the JSON rows to")
    p.add_argument("--note", default="", help="free text stored in every row (e.g. what the run is: before / after)")
    p.add_argument(
        "--real",
        type=int,
        default=0,
        metavar="ITERS",
        help="also time CLIP ViT-B/32 text and vision at b1 / b8 (ITERS calls each, 2 threads)",
    )
    p.add_argument("--no-triton", action="store_true", help=f"leave out the {STUB} row")
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    torch.set_num_threads(1)
    stub = not args.no_triton
    if stub:  # the triton backend on CPU tensors: only under the interpreter, whose kernels the stubs replace
        os.environ["TRITON_INTERPRET"] = "1"
    models = competitors(stub)
    ids = torch.randint(0, 1000, (1, SEQ))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    samples: dict[str, list[float]] = {k: [] for k in models}  # wall ms
    cpu: dict[str, list[float]] = {k: [] for k in models}  # this thread's CPU ms: robust on a busy machine
    timer = Timer(torch.device("cpu"))
    with torch.inference_mode():
        for _ in range(args.warmup):
            for m in models.values():
                m(**inputs)
        for _ in range(args.iters):  # interleaved: drift hits every competitor alike
            for name, m in models.items():
                w, c = timer.once_cpu(lambda: m(**inputs))  # noqa: B023 - called at once
                samples[name].append(w)
                cpu[name].append(c)
    with torch.inference_mode(), fastenc.trace() as t:
        models["fastenc_torch"](**inputs)
    fastenc_ops = {k: v / LAYERS for k, v in sorted(t.counts.items())}
    base = percentile(samples["transformers_sdpa"], 50)
    base_cpu = percentile(cpu["transformers_sdpa"], 50)
    meta = {
        "bench": "overhead",
        "model": f"CLIP text, {LAYERS} layers, hidden {HIDDEN}, b1x{SEQ}",
        "threads": 1,
        "torch": torch.__version__,
        "commit": git_commit(),
        "machine": _machine(),
        "load_avg_1m": os.getloadavg()[0],  # the machine's load at the end of the timing: a busy machine shows here
        **({"note": args.note} if args.note else {}),
    }
    rows = []
    print(f"# {meta['model']}, 1 thread, median of {args.iters}; torch {torch.__version__}")
    head = f"{'competitor':30} {'p50 ms':>8} {'vs sdpa':>8} {'cpu p50 ms':>10} {'vs sdpa':>8} {'aten ops/layer':>15}"
    print(head, f"{'py calls/layer':>15}")
    for name, s in samples.items():
        med, med_cpu = percentile(s, 50), percentile(cpu[name], 50)
        per_layer = aten_ops_per_forward(models[name], inputs) / LAYERS
        calls = python_calls_per_forward(models[name], inputs) / LAYERS
        proxy = (
            {"proxy": "GPU batch-1 host time: triton backend, kernel launches replaced by fakes"}
            if name == STUB
            else {}
        )
        rows.append(
            _row(
                meta,
                name,
                s,
                cpu[name],
                ratio_vs_sdpa=med / base,
                cpu_p50_ms=med_cpu,
                cpu_ratio_vs_sdpa=med_cpu / base_cpu,
                aten_ops_per_layer=per_layer,
                python_calls_per_layer=calls,
                **proxy,
            )
        )
        line = f"{name:30} {med:8.3f} {med / base:8.2f} {med_cpu:10.3f} {med_cpu / base_cpu:8.2f} {per_layer:15.1f}"
        print(line, f"{calls:15.1f}")
    rows[2]["fastenc_trace_ops_per_layer"] = fastenc_ops
    print("fastenc trace, per layer:", {k: round(v, 2) for k, v in fastenc_ops.items()})
    if args.real:
        real_meta = {k: v for k, v in meta.items() if k not in ("model", "threads", "load_avg_1m")}
        rows += real_sizes(args.real, 2, real_meta)
    if args.out:
        append_rows(RESULTS / args.out, rows)
    return 0


def _row(meta: dict, competitor: str, samples_ms: list[float], cpu_samples_ms: list[float], **fields) -> dict:
    """One row of the bench schema (fastenc.benchmark.rows): p50_ms etc. from the wall samples, this script's own
    fields (the machine's load at the row's making, the CPU-time samples and ratios) beside them."""
    config = {"layers": LAYERS, "hidden": HIDDEN, "seq": SEQ} if meta["model"].startswith("CLIP text,") else {}
    config.update({k: meta[k] for k in ("batch", "threads") if k in meta})
    return make_row(
        "bench_overhead",
        meta["model"],
        competitor,
        samples_ms=samples_ms,
        mode="host-forward",
        config=config,
        dtype="fp32",
        device=meta["machine"],
        versions={"torch": meta["torch"]},
        commit=meta["commit"],
        notes=meta.get("note", ""),
        **{k: v for k, v in meta.items() if k != "commit"},
        cpu_samples_ms=cpu_samples_ms,
        **fields,
    )


def _machine() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{platform.machine()} {model}".strip()


if __name__ == "__main__":
    sys.exit(main())

"""Time fastenc's Triton attention against torch SDPA and the plain-torch reference on CUDA.

    python bench/bench_attention.py                                   # CLIP/T5-style shapes, fp16
    python bench/bench_attention.py --dtype bf16 --causal --mask      # CLIP text: causal + padding
    python bench/bench_attention.py --shape 4,12,512,64 --bias --out t5.json

Shapes are B,H,S,D. Inputs are views of one packed (B, S, 3, H, D) projection output, as the fused towers pass
them. Times are fastenc.benchmark.timing.Timer samples (CUDA events, L2 flushed before each call) for --rep ms after
--warmup ms, p20/p50/p80 from the raw samples; TFLOP/s = flops() / p50. With --out, rows of the one bench schema
(fastenc.benchmark.rows.make_row: shape, kernel config, samples, gpu, versions, git commit) are appended to a JSON list
under bench/results/.

run_case(Case, providers, measure) yields one row per provider of one case; bench/gpu_session.py's attention
phase calls it with interleaved samples (one Timer sample of every provider per round) instead.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from _common import (
    EXIT_NO_CUDA,
    cuda_timer,
    kernel_env,
    kernel_error_row,
    kernel_row,
    no_cuda,
    parse_providers,
    print_kernel_env,
    save_results,
    shape_parser,
)

DEFAULT_SHAPES = [(64, 12, 77, 64), (32, 16, 257, 64), (8, 16, 577, 64)]  # CLIP text B/32, ViT-L/14, ViT-L/14-336
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SDPA_BACKENDS = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
}
PROVIDERS = ("fastenc", "kernel", "cuda", "cuda_kernel", "sdpa", *SDPA_BACKENDS, "compile", "reference")
DEFAULT_PROVIDERS = ("fastenc", "kernel", "cuda", "cuda_kernel", "sdpa", "reference")
CUDA_ONLY = ("cuda", "cuda_kernel", *SDPA_BACKENDS)  # skipped off CUDA (SDPA's fused backends, the csrc/ kernels)


def flops(b: int, h: int, sq: int, sk: int, d: int, causal: bool) -> float:
    """Forward FLOPs of attention: two matmuls (q @ k^T and p @ v), 2 * Sq * Sk * D each, per (b, h).

    Causal counts the kept (i, j) pairs only: Sq * (Sq + 1) / 2 of Sq * Sk (Sq == Sk)."""
    pairs = sq * (sq + 1) / 2 if causal else sq * sk
    return 4.0 * b * h * pairs * d


def make_inputs(b, h, s, d, dtype, *, mask: bool, bias: bool, device="cuda"):
    qkv = torch.randn(b, s, 3, h, d, dtype=dtype, device=device)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, S, D), views
    kpm = None
    if mask:  # right padding: batch row i keeps its first len_i keys, len_i in [1, S]
        lens = torch.randint(1, s + 1, (b,), device=device)
        kpm = torch.arange(s, device=device)[None, :] < lens[:, None]  # (B, S) bool
    bias_t = torch.randn(1, h, s, s, dtype=dtype, device=device) if bias else None  # T5-style position bias
    return q, k, v, kpm, bias_t


def sdpa_mask(q, kpm, bias, causal):
    """(SDPA's additive float attn_mask or None, is_causal): padding, bias and causal folded into one mask, since
    SDPA takes one; with no mask, causal stays SDPA's is_causal flag."""
    if kpm is None and bias is None:
        return None, causal
    mask = torch.zeros(1, 1, 1, 1, dtype=q.dtype, device=q.device)
    if kpm is not None:
        mask = mask.masked_fill(~kpm[:, None, None, :], float("-inf"))
    if bias is not None:
        mask = mask + bias
    if causal:
        s = q.shape[2]
        tri = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        mask = mask.masked_fill(~tri, float("-inf"))
    return mask, False


@dataclass(frozen=True)
class Case:
    """One attention shape. bias: a dense (1, H, S, S) additive bias; relbias: T5's bucket table and lut (32
    buckets), the op gathering it per tile and SDPA / compile reading it materialised."""

    B: int
    H: int
    S: int
    D: int
    dtype: torch.dtype
    causal: bool = False
    padding: bool = False
    bias: bool = False
    relbias: bool = False
    model: str = ""

    def config(self) -> dict:
        return dict(B=self.B, H=self.H, S=self.S, D=self.D, causal=self.causal, padding=self.padding,
                    relbias=self.relbias, dtype=str(self.dtype)[6:], model=self.model)  # fmt: skip


def eager_attention(q, k, v, mask, scale):
    """What users write and torch.compile fuses: matmuls in the input dtype, softmax in fp32."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    return torch.matmul(p, v)


def compiled_attention(dry: bool):
    """(torch.compile of eager_attention, its label); dry: backend="eager" (the wiring without inductor's CPU
    compile time). Every shape compiles once: dynamo's recompile limit is raised to 64."""
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
    if dry:
        return torch.compile(eager_attention, backend="eager"), "torch.compile(backend=eager) [dry-run stand-in]"
    return torch.compile(eager_attention), "torch.compile (inductor)"


def case_inputs(case: Case, device) -> dict:
    """q, k, v (views of one packed projection), the masks and biases of `case`, SDPA's folded mask and the fp32
    reference output."""
    q, k, v, kpm, bias = make_inputs(case.B, case.H, case.S, case.D, case.dtype, mask=case.padding, bias=case.bias,
                                     device=device)  # fmt: skip
    from fastenc.ops.reference import attention_reference, relative_bias_reference, relative_position_buckets

    table = lut = None
    dense = bias
    if case.relbias:
        table = torch.randn(32, case.H, device=device, dtype=case.dtype)
        lut = relative_position_buckets(case.S, case.S, device=device)
        dense = relative_bias_reference(table, lut, case.S, case.S).to(case.dtype)  # (1, H, S, S), for SDPA
    scale = case.D**-0.5
    mask, sdpa_causal = sdpa_mask(q, kpm, dense, case.causal)
    eager_mask = mask if mask is not None else (causal_mask(q) if sdpa_causal else None)
    ref = attention_reference(q.float(), k.float(), v.float(), kpm, None if bias is None else bias.float(), table,
                              lut, causal=case.causal, scale=scale)  # fmt: skip
    return dict(q=q, k=k, v=v, kpm=kpm, bias=bias, table=table, lut=lut, scale=scale, mask=mask,
                sdpa_causal=sdpa_causal, eager_mask=eager_mask, ref=ref)  # fmt: skip


def causal_mask(q):
    """(S, S) additive mask, -inf above the diagonal."""
    n = q.shape[2]
    tri = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return torch.zeros(n, n, dtype=q.dtype, device=q.device).masked_fill(~tri, float("-inf"))


def providers(inp: dict, compiled=None) -> dict:
    """name -> (zero-argument call, SDPA backend it is restricted to or None, provider label). compiled: the
    (function, label) pair of compiled_attention; without it "compile" is absent."""
    import fastenc

    q, k, v, kpm, bias, causal, scale = (inp[n] for n in ("q", "k", "v", "kpm", "bias", "causal", "scale"))
    rel = dict(rel_bias_table=inp["table"], rel_bias_lut=inp["lut"])

    def op(backend):
        return lambda: fastenc.ops.attention(q, k, v, causal=causal, key_padding_mask=kpm, bias=bias, scale=scale,
                                             backend=backend, strict=True, **rel)  # fmt: skip

    def kernel():
        from fastenc.kernels.attention import attention_forward

        return attention_forward(q, k, v, causal=causal, key_padding_mask=kpm, bias=bias, scale=scale)

    def cuda_kernel():  # the csrc/ short-sequence kernel (Sk <= 128, fp16/bf16, no bias), its launcher
        from fastenc.core import cuda as _cuda

        return _cuda.cuda_attention_forward(q, k, v, causal=causal, key_padding_mask=kpm, bias=bias, scale=scale)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=inp["mask"], is_causal=inp["sdpa_causal"], scale=scale
        )

    def reference():
        from fastenc.ops.reference import attention_reference

        return attention_reference(q, k, v, kpm, bias, inp["table"], inp["lut"], causal=causal, scale=scale)

    fns = {
        "fastenc": (op("triton"), None, "fastenc.ops.attention backend=triton"),
        "kernel": (kernel, None, "fastenc.kernels.attention launcher"),
        "cuda": (op("cuda"), None, "fastenc.ops.attention backend=cuda"),
        "cuda_kernel": (cuda_kernel, None, "csrc/ attention launcher"),
        "sdpa": (sdpa, None, "torch SDPA"),
        **{name: (sdpa, backend, f"torch SDPA, {backend} only") for name, backend in SDPA_BACKENDS.items()},
        "reference": (reference, None, "fastenc.ops.reference.attention_reference"),
    }
    if compiled is not None:
        fn, label = compiled
        fns["compile"] = (lambda: fn(q, k, v, inp["eager_mask"], scale), None, label)
    return fns


def sdpa_context(backend: str | None):
    """A context-manager factory restricting SDPA to `backend` (None: no restriction)."""
    if backend is None:
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return lambda: sdpa_kernel([getattr(SDPBackend, backend)])


def interleaved(timer, iters: int):
    """A measure for run_case: `iters` rounds, round i taking one Timer sample of every provider (drift hits all
    alike); per provider the summary (p50_ms, p90_ms, ...) and the raw samples."""
    from fastenc.benchmark.timing import summarize

    def measure(live: dict) -> dict:
        samples = {n: [] for n in live}
        for _ in range(iters):
            for n, (fn, ctx) in live.items():
                with ctx():
                    samples[n].append(timer.once(fn))
        return {n: dict(summarize(xs), samples_ms=xs, iters=iters, timer=timer.name) for n, xs in samples.items()}

    return measure


def budget_quantiles(timer, warmup_ms: float, rep_ms: float):
    """A measure for run_case: per provider, one after another, Timer.budget_samples (untimed calls for warmup_ms,
    then as many timed calls as fit rep_ms); the summary, p20 / p50 / p80 and the raw samples."""
    from fastenc.benchmark.timing import quantiles, summarize

    def measure(live: dict) -> dict:
        out = {}
        for n, (fn, ctx) in live.items():
            with ctx():
                xs = timer.budget_samples(fn, warmup_ms, rep_ms)
            out[n] = {**summarize(xs), **quantiles(xs), "samples_ms": xs, "iters": len(xs), "timer": timer.name}
        return out

    return measure


def run_case(case: Case, names, measure, *, device, warmup: int = 0, compiled=None, tuned: bool = True):
    """Yield one row per provider of `case`, after all of them are timed by `measure` (see interleaved).

    names: provider names (PROVIDERS), or a {row name: provider} dict. Each provider's first call is timed
    (compile / autotune), checked against the fp32 reference (max_abs_err, nonfinite) and followed by `warmup`
    calls; a provider that refuses the inputs (fastenc strict, SDPA's "No available kernel") is a skipped row with
    the reason, SDPA's warnings included; one that needs CUDA is skipped off CUDA. tuned: record the Triton
    autotuner's pick on the fastenc rows (not under the interpreter)."""
    from fastenc.core.errors import BackendUnavailableError

    device = torch.device(device)
    names = names if isinstance(names, dict) else {n: n for n in names}
    torch.manual_seed(0)
    inp = dict(case_inputs(case, device), causal=case.causal)
    ref = inp["ref"]
    fns = providers(inp, compiled)
    flops_ = flops(case.B, case.H, case.S, case.S, case.D, case.causal)
    # PyTorch's own error in this dtype (the 2x rule's baseline): the eager composite in the input dtype
    eager = eager_attention(inp["q"], inp["k"], inp["v"], inp["eager_mask"], inp["scale"])
    eager_err = (eager.float() - ref).abs().max().item()
    rows, live = {}, {}
    for name, provider in names.items():
        fn, backend, label = fns[provider]
        row = dict(config=case.config(), competitor=name, provider=label, flops=flops_, torch_err=eager_err)
        rows[name] = row
        if device.type != "cuda" and provider in CUDA_ONLY:
            row.update(status="skipped", reason="needs a CUDA device (SDPA's fused backends and fastenc's CUDA "
                       "kernels are CUDA-only)")  # fmt: skip
            continue
        ctx, caught = sdpa_context(backend), []
        try:
            with warnings.catch_warnings(record=True) as caught, ctx():
                warnings.simplefilter("always")  # SDPA says in warnings why a backend refuses the inputs
                t0 = time.perf_counter()
                out = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                first = time.perf_counter() - t0
            err = (out.float() - ref).abs().nan_to_num(float("inf")).max().item()
            row.update(status="ok", first_call_s=first, max_abs_err=err,
                       nonfinite=int((~torch.isfinite(out)).sum().item()))  # fmt: skip
            del out
            with ctx():
                for _ in range(warmup):
                    fn()
            if provider in ("fastenc", "kernel") and tuned:
                row["autotuned"] = chosen_config()  # the autotuner's pick for these inputs
            live[name] = (fn, ctx)
        except Exception as e:  # noqa: BLE001 - a refusal is a skip with SDPA's reasons, anything else an error
            notes = "; ".join(sorted({str(w.message)[:200] for w in caught or []}))
            unsupported = isinstance(e, BackendUnavailableError) or "No available kernel" in str(e)
            reason = f"{type(e).__name__}: {e}".replace("\n", " ")[:600] + (f" [{notes}]" if notes else "")
            row.update(status="skipped" if unsupported else "error", reason=reason)
    for name, stats in measure(live).items():
        rows[name].update(stats, tflops=flops_ / (stats["p50_ms"] * 1e-3) / 1e12)
    for name in live:
        rows[name]["speedup_vs"] = {o: rows[o]["p50_ms"] / rows[name]["p50_ms"] for o in live if o != name}
    yield from rows.values()


def chosen_config() -> dict | None:
    """The autotuner's pick for the last launch (None before any launch)."""
    from fastenc.kernels.attention import _autotuned_attention_kernel

    best = getattr(_autotuned_attention_kernel(), "best_config", None)
    if best is None:
        return None
    return {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}


parse_shape = shape_parser("B,H,S,D")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=parse_shape, action="append", help="B,H,S,D (repeatable); default: CLIP shapes")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--mask", action="store_true", help="random right-padding key_padding_mask")
    p.add_argument("--bias", action="store_true", help="(1, H, S, S) additive bias, as T5")
    p.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS), help=f"comma list from {PROVIDERS}")
    p.add_argument("--warmup", type=int, default=25, help="untimed warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="timed calls for this long, ms")
    p.add_argument("--out", help="JSON file to append rows to (a bare name goes under bench/results/)")
    args = p.parse_args(argv)

    if no_cuda("bench_attention: no CUDA device found; this benchmark times GPU kernels and needs one."):
        return EXIT_NO_CUDA

    names = parse_providers(p, args.providers, PROVIDERS)
    env = kernel_env()
    print_kernel_env(env)
    print(f"# dtype {args.dtype}  causal {args.causal}  mask {args.mask}  bias {args.bias}")
    print(f"{'B,H,S,D':>16} {'provider':>10} {'p50 ms':>9} {'p20 ms':>9} {'p80 ms':>9} {'TFLOP/s':>8} {'max err':>9}")
    compiled = compiled_attention(dry=False) if "compile" in names else None
    rows = []
    for b, h, s, d in args.shape or DEFAULT_SHAPES:
        case = Case(b, h, s, d, DTYPES[args.dtype], causal=args.causal, padding=args.mask, bias=args.bias)
        label, shape = f"{f'{b},{h},{s},{d}':>16}", {"B": b, "H": h, "S": s, "D": d}
        measure = budget_quantiles(cuda_timer(), args.warmup, args.rep)
        for r in run_case(case, names, measure, device="cuda", compiled=compiled):
            name = r["competitor"]
            if r["status"] != "ok":  # the cuda providers refuse Sk > 128, bias, fp32: a row saying why
                print(f"{label} {name:>10} skipped: {r['reason']}"[:200])
                row = kernel_error_row("bench_attention", env, "attention", name, r["reason"], mode="forward",
                                       config=shape, dtype=args.dtype, shape=shape)  # fmt: skip
                rows.append(row)
                continue
            p20, p50, p80, err = r["p20_ms"], r["p50_ms"], r["p80_ms"], r["max_abs_err"]
            print(f"{label} {name:>10} {p50:9.4f} {p20:9.4f} {p80:9.4f} {r['tflops']:8.2f} {err:9.2e}")
            rows.append(
                kernel_row(
                    "bench_attention",
                    env,
                    "attention",
                    name,
                    r["samples_ms"],
                    mode="forward",
                    config=shape,
                    dtype=args.dtype,
                    shape=shape,
                    causal=args.causal,
                    mask=args.mask,
                    bias=args.bias,
                    kernel_config=r.get("autotuned"),
                    flops=r["flops"],
                    tflops_p50=r["tflops"],
                    max_abs_err_vs_reference=err,
                    budget_ms={"warmup": args.warmup, "rep": args.rep},
                )
            )

    if args.out:
        save_results(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

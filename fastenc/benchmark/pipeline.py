"""`fastenc bench --pipeline DIR`: a diffusers pipeline's `encode_prompt` timed eager (the untouched pipeline),
through fastenc, through fastenc with CUDA graphs (CUDA only) and as a PromptCache hit, in one process on the same
prompts; plus the cost of the cache's weights fingerprint. One JSON row per (competitor, batch, dtype).

The fastenc variants are `from_pipe` copies of the loaded pipeline (components shared, so the weights are loaded once);
`fastenc.optimize` swaps their encoders only. Each fastenc row carries `max_abs_diff`, its largest difference from the
eager row's outputs (every tensor encode_prompt returns).
"""

from __future__ import annotations

from ..core.errors import InputError
from .rows import append_jsonl, make_row
from .timing import Timer

PROMPT = "a photo of a red cat riding a blue horse under the night sky, highly detailed, cinematic lighting"


def _fork(pipe):
    """A pipeline object over the same component objects (diffusers' from_pipe; the constructor where missing)."""
    cls = type(pipe)
    if hasattr(cls, "from_pipe"):
        new = cls.from_pipe(pipe)
    else:
        new = cls(**pipe.components)
    if hasattr(new, "set_progress_bar_config"):
        new.set_progress_bar_config(disable=True)
    return new


def bench_pipeline(
    path,
    *,
    device: str = "cpu",
    dtype: str = "fp32",
    batches=(1,),
    prompt: str = PROMPT,
    negative: bool = True,
    max_sequence_length: int | None = None,
    warmup: int = 2,
    iters: int = 10,
    backend: str = "auto",
    label: str = "",
) -> list[dict]:
    """Rows for one pipeline folder (see the module docstring)."""
    import torch

    import fastenc

    from ..pipelines import encode_prompt, load_pipeline, weights_fingerprint
    from .env import device_info, git_commit, utc_now, versions

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise InputError(f"--dtype takes fp32, fp16 or bf16 with --pipeline, got {dtype!r}")
    dev = torch.device(device)
    eager = load_pipeline(path, dtype=dtypes[dtype], device=dev)
    fast = fastenc.optimize(_fork(eager), backend=backend)
    cache = fastenc.PromptCache()
    cached = fastenc.optimize(_fork(eager), backend=backend, prompt_cache=cache)
    competitors = {"eager": eager, "fastenc": fast, "fastenc+prompt-cache-hit": cached}
    if dev.type == "cuda":
        competitors["fastenc+cuda-graphs"] = fastenc.optimize(_fork(eager), backend=backend, cuda_graphs=True)
    timer = Timer(dev, flush_l2=False, host=True)  # perf_counter with a synchronize on either side on CUDA
    env = {"commit": git_commit(), "time": utc_now(), "versions": versions(), "device": device_info(dev)}
    env["versions"]["diffusers"] = __import__("diffusers").__version__
    family = type(eager).__name__
    encoders = list(fast._fastenc_components)
    import inspect

    negative = negative and "negative_prompt" in inspect.signature(eager.encode_prompt).parameters  # not FLUX
    rows = []
    for batch in batches:
        prompts = [prompt] * batch if batch > 1 else prompt
        kw = dict(
            negative_prompt=(["blurry, low quality"] * batch if batch > 1 else "blurry, low quality")
            if negative
            else None,
            max_sequence_length=max_sequence_length,
            device=dev,
        )
        ref = encode_prompt(eager, prompts, **kw)
        for name, pipe in competitors.items():
            fn = lambda pipe=pipe, prompts=prompts, kw=kw: encode_prompt(pipe, prompts, **kw)  # noqa: E731
            out = fn()  # warm: first-call costs, the cache's one miss per prompt
            diff = max((out[k].float() - ref[k].float()).abs().max().item() for k in ref)
            samples = timer.warm_samples(fn, warmup, iters)
            rows.append(_encode_row(family, name, batch, dtype, dev, samples, label, env, encoders, max_abs_diff=diff))
        fingerprint = lambda: [weights_fingerprint(getattr(fast, n)) for n in encoders]  # noqa: E731
        fp_ms = timer.warm_samples(fingerprint, 1, max(3, iters // 2))
        rows.append(_encode_row(family, "fingerprint (all encoders)", batch, dtype, dev, fp_ms, label, env, encoders))
    return rows


def _encode_row(family, competitor, batch, dtype, dev, samples, label, env, encoders, **extra) -> dict:
    """One encode_prompt row (fastenc.benchmark.rows.make_row) with the pipeline's own fields."""
    return make_row(
        "fastenc bench --pipeline",
        f"{family}.encode_prompt",
        competitor,
        samples_ms=samples,
        config={"pipeline": family, "encoders": encoders, "batch": batch},
        dtype=dtype,
        device=str(dev),
        versions=env["versions"],
        commit=env["commit"],
        notes=label,
        bench="encode_prompt",
        pipeline=family,
        encoders=encoders,
        batch=batch,
        iters=len(samples),
        label=label,
        env=env,
        **{k: (round(v, 8) if isinstance(v, float) else v) for k, v in extra.items()},
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| pipeline | competitor | batch | dtype | device | p50 ms | p20 ms | p80 ms | vs eager | max abs diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    eager = {(r["pipeline"], r["batch"], r["dtype"]): r["p50_ms"] for r in rows if r["competitor"] == "eager"}
    for r in rows:
        base = eager.get((r["pipeline"], r["batch"], r["dtype"]))
        timed_call = not r["competitor"].startswith("fingerprint")
        speed = f"{base / r['p50_ms']:.2f}x" if timed_call and base and r["p50_ms"] > 0 else ""
        diff = f"{r['max_abs_diff']:.2e}" if "max_abs_diff" in r else ""
        lines.append(
            f"| {r['pipeline']} | {r['competitor']} | {r['batch']} | {r['dtype']} | {r['device']} | "
            f"{r['p50_ms']:.3f} | {r['p20_ms']:.3f} | {r['p80_ms']:.3f} | {speed} | {diff} |"
        )
    return "\n".join(lines)


def cmd_bench_pipeline(args) -> int:
    """`fastenc bench --pipeline DIR [--prompt ...] [--batch 1,4] [--dtype fp16] [--device cuda] [--seq N]`."""
    from .._cli_common import split_ints, split_names

    dtypes = split_names(args.dtype) or ["fp32"]
    batches = split_ints(args.batch) or [1]
    if min(batches) < 1:
        raise InputError("--batch values must be >= 1")
    seqs = split_ints(args.seq)
    if seqs is not None and (len(seqs) != 1 or seqs[0] < 1):
        raise InputError("--seq with --pipeline takes one T5 max_sequence_length >= 1")
    for flag in ("warmup", "iters"):
        if getattr(args, flag) is not None and getattr(args, flag) < (1 if flag == "iters" else 0):
            raise InputError(f"--{flag} is too small")
    if args.device:
        from .._cli_common import parse_device

        device = str(parse_device(args.device))
    else:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for dtype in dtypes:
        rows += bench_pipeline(
            args.pipeline,
            device=device,
            dtype=dtype,
            batches=batches,
            prompt=args.prompt or PROMPT,
            max_sequence_length=seqs[0] if seqs else None,
            warmup=args.warmup if args.warmup is not None else 2,
            iters=args.iters if args.iters is not None else 10,
            label=args.label,
        )
    print(table(rows))
    if args.out is not None:
        append_jsonl(args.out, rows)
        print(f"# appended {len(rows)} rows to {args.out}")
    return 0

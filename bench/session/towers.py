"""Phase towers: CLIP ViT-L/14 text / vision, T5-XXL encoder (2/24 layers) bf16, fp16 in a NaN check, SigLIP So400M
vision, through fastenc.benchmark's runner: p50 latency, throughput, MFU vs the in-run GEMM peak (torch.compile
reduce-overhead is out of the one-call plan: bench/bench_graphs.py measures it)."""

from __future__ import annotations

from .common import Phase, Step, fmt, md_table, section, short

_TEXT = ["eager", "sdpa", "fastenc-triton", "fastenc-cuda", "fastenc-triton+graphs", "fastenc-cuda+graphs"]


def _runner_step(name, est, dry_est, model, dtype, batches, competitors, dry_model, dry_competitors, seq=None):
    """A step of fastenc.benchmark's runner: one model, one dtype; the dry run's tiny model and competitors (and
    seq 16 where the step sets a seq)."""
    spec = dict(models=[model], dtypes=[dtype], batches=batches, competitors=competitors)
    spec["dry"] = dict(models=[dry_model], competitors=dry_competitors)
    if seq:
        spec["seqs"], spec["dry"]["seqs"] = [seq], [16]
    return Step(name, est, dry_est, spec)


# fmt: off
STEPS = (
    _runner_step("clip-l-text", 50, 8, "clip-vit-l-14-text", "fp16", [1, 32], _TEXT, "tiny-clip-text", _TEXT),
    _runner_step("clip-l-vision", 35, 4, "clip-vit-l-14-vision", "fp16", [1, 32, 256], _TEXT, "tiny-clip-vision",
                 ["sdpa", "fastenc-triton", "fastenc-cuda+graphs"]),
    # fp16 T5-XXL: the nan-check step below runs it
    _runner_step("t5-xxl", 18, 4, "t5-v1_1-xxl", "bf16", [8], ["eager", "sdpa", "fastenc-triton", "fastenc-cuda",
                 "fastenc-triton+graphs"], "tiny-t5", ["sdpa", "fastenc-triton"], seq=256),
    Step("t5-xxl-nan-check", 12, 3, dict(model="t5-v1_1-xxl", dtypes=["fp16", "bf16"], batch=8, seq=256,
         competitors=["eager", "sdpa", "fastenc-triton", "fastenc-cuda"],
         dry=dict(model="tiny-t5", seq=16, competitors=["eager", "sdpa", "fastenc-triton"]))),
    _runner_step("siglip-so400m-vision", 22, 4, "siglip-so400m-14-384-vision", "bf16", [32],
                 ["sdpa", "fastenc-triton", "fastenc-cuda", "fastenc-triton+graphs"], "tiny-siglip-vision",
                 ["sdpa", "fastenc-triton"]),
)
# fmt: on
SETTINGS = dict(iters=30, warmup=5, throughput_iters=10, row_budget_s=8.0, peak_n=None)
DRY_SETTINGS = dict(iters=1, warmup=0, throughput_iters=0, row_budget_s=5.0, peak_n=128, batches=[1])


def run(s) -> None:
    torch = s.setup_torch()
    from fastenc.benchmark import runner

    runner.git_commit = lambda *a, **k: s.commit  # the device copy of the tree has no .git: the session's commit
    settings = DRY_SETTINGS if s.dry else SETTINGS

    def bench(s, step):
        sp = dict(step.spec)
        if s.dry:
            sp.update(sp["dry"])
        if step.name.endswith("nan-check"):
            return _nan_check(s, sp)
        cfg = runner.BenchConfig(
            models=sp["models"],
            competitors=sp["competitors"],
            batches=settings.get("batches") or sp["batches"],
            dtypes=["fp32"] if s.dry and len(sp["dtypes"]) == 1 else sp["dtypes"],
            seqs=sp.get("seqs"),
            device=s.device.type,
            warmup=settings["warmup"],
            iters=settings["iters"],
            throughput_iters=settings["throughput_iters"],
            row_budget_s=settings["row_budget_s"],
            peak_n=settings["peak_n"],
            out=s.rows_path,  # the runner appends each (model, dtype) group to the session's rows as it finishes
            progress=False,
            quick=s.dry,
            label=f"gpu-session {s.session_id} towers/{step.name}",
        )
        runner.run(cfg)

    def _nan_check(s, sp):
        """Whole-output finiteness and error against an fp32 sdpa run of the same weights (the runner's own check
        compares a corner of the output only)."""
        from fastenc.benchmark import competitors as comp
        from fastenc.benchmark.matrix import DTYPES, MODELS

        spec = MODELS[sp["model"]]
        batch, seq = sp.get("batch", 1) if not s.dry else 1, sp["seq"]
        workdir = s.out / "_work"
        ref_model = spec.build("sdpa", s.device, torch.float32)
        with torch.inference_mode():
            ref = comp.first_output(ref_model(**spec.inputs(batch, seq, s.device, torch.float32))).float()
        del ref_model
        for dname in sp["dtypes"]:
            dtype = getattr(torch, DTYPES[dname])
            ctx = comp.Context(s.device, dtype, dname, workdir)
            for name in sp["competitors"]:
                row = dict(config=dict(model=spec.label, dtype=dname, batch=batch, seq=seq), competitor=name)
                r = out = None
                try:
                    r = comp.build(name, spec, ctx)  # outside inference mode, as users build models
                    with torch.inference_mode():
                        out = comp.first_output(r.call(r.prepare(spec.inputs(batch, seq, s.device, dtype)))).float()
                    finite = torch.isfinite(out)
                    diff = (out - ref).abs()[finite]
                    row.update(
                        status="ok",
                        provider=r.provider,
                        nonfinite=int((~finite).sum().item()),
                        numel=out.numel(),
                        max_abs_err=diff.max().item() if diff.numel() else None,
                        max_rel_err=(diff.max() / ref.abs().max()).item() if diff.numel() else None,
                        ref_absmax=ref.abs().max().item(),
                    )
                    r.close()
                except comp.Skip as e:
                    row.update(status="skipped", reason=str(e))
                except Exception as e:  # noqa: BLE001
                    row.update(status="error", reason=short(e))
                finally:
                    r = out = None  # noqa: F841 (free the model before the next is built)
                s.row("nan_check", **row)
                if s.device.type == "cuda":
                    torch.cuda.empty_cache()

    s.run_steps(bench)


def is_tower_row(r: dict) -> bool:
    """A fastenc bench row of the runner (labelled `gpu-session <session> towers/<step>`)."""
    return "config" in r and "competitor" in (r.get("config") or {}) and "run_id" in r


def _tower_cells(r: dict, base: dict | None) -> list[str]:
    c = r["config"]
    head = [c["label"], c["dtype"], str(c["batch"]), str(c["seq"]), c["competitor"]]
    if r.get("status") != "ok":
        return [*head, r.get("status"), "", "", "", "", "", "", (r.get("reason") or "")[:160]]
    x = base["p50_ms"] / r["p50_ms"] if base else None
    return [
        *head,
        fmt(r["p50_ms"]),
        fmt(r.get("p90_ms")),
        fmt(r.get("items_per_s"), ".1f"),
        fmt(r.get("throughput_items_per_s"), ".1f"),
        fmt(r.get("tflops"), ".1f"),
        fmt(r.get("mfu"), ".1%"),
        fmt(x, ".2f"),
        f"first call {fmt(r.get('first_call_s'), '.1f')} s; err {fmt(r.get('check_max_rel'), '.1e')}",
    ]


TOWER_HEAD = ["model", "dtype", "batch", "seq", "competitor", "p50 ms", "p90 ms", "items/s", "stream items/s"]
TOWER_HEAD += ["TFLOP/s", "MFU", "x vs sdpa", "notes"]
NAN_COLUMNS = (
    ("model", lambda r: r["config"]["model"]),
    ("dtype", lambda r: r["config"]["dtype"]),
    ("competitor", lambda r: r["competitor"]),
    ("status", lambda r: r["status"]),
    ("non-finite", lambda r: str(r.get("nonfinite", "-"))),
    ("max abs err", lambda r: fmt(r.get("max_abs_err"), ".3e")),
    ("max rel err", lambda r: fmt(r.get("max_rel_err"), ".3e")),
)


def summary(rows: list[dict]) -> list[str]:
    """The towers table (speedups against sdpa in the same case) and the T5 finiteness table."""
    by_case: dict[tuple, dict] = {}
    for r in filter(is_tower_row, rows):
        c = r["config"]
        by_case.setdefault((c["label"], c["dtype"], c["batch"], c["seq"]), {})[c["competitor"]] = r
    lines = []
    if by_case:
        table = []
        for group in by_case.values():
            base = group.get("sdpa") if (group.get("sdpa") or {}).get("status") == "ok" else None
            table += [_tower_cells(r, base) for r in group.values()]
        lines += ["## Towers (one request at a time, L2 flushed; MFU against the in-run GEMM peak)", ""]
        lines += md_table(TOWER_HEAD, table) + [""]
    nan = [r for r in rows if r.get("kind") == "nan_check"]
    return lines + section("T5 finiteness (whole output; error against fp32 sdpa, same weights)", nan, NAN_COLUMNS)


def failures(rows: list[dict]) -> list[dict]:
    """fastenc outputs with NaN / inf in the NaN check."""
    return [
        dict(r, reason=f"{r['nonfinite']} non-finite values")
        for r in rows
        if r.get("kind") == "nan_check" and r.get("nonfinite") and str(r.get("competitor", "")).startswith("fastenc")
    ]


PHASE = Phase(
    "towers",
    "CLIP ViT-L/14 text+vision, T5-XXL (2/24) + NaN check, SigLIP So400M: p50, throughput, MFU",
    240,
    STEPS,
    run,
    summary,
    failures,
)

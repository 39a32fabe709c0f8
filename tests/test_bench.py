"""fastenc bench harness (fastenc/benchmark/): the CPU quick mode produces valid JSONL rows, Markdown and PNGs;
every requested competitor yields a row or an explicit skip reason; speedups agree with the recorded p50s; the
FLOPs formula matches torch's FLOP counter. These prove the harness, not the speed (timings here are noise)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from fastenc.benchmark import cli, matrix, report, runner
from fastenc.benchmark.timing import percentile
from fastenc.core.dispatch import triton_interpret

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK_MODELS = ["tiny-clip-text", "tiny-clip-vision", "tiny-t5"]
COMPETITORS = [
    "eager",
    "sdpa",
    "fastenc-torch",
    "fastenc-triton",
    "fastenc-cuda",
    "fastenc-triton+graphs",
    "onnxruntime",
    "tensorrt",
]
ITERS = 3


def _has_onnx_export() -> bool:
    find = importlib.util.find_spec
    return find("onnxruntime") is not None and find("fastenc.export") is not None


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.jsonl"
    argv = ["--quick", "--models", ",".join(QUICK_MODELS), "--competitors", ",".join(COMPETITORS)]
    argv += ["--iters", str(ITERS), "--warmup", "1", "--throughput-iters", "2", "--out", str(out), "--no-progress"]
    assert cli.bench_main(argv) == 0
    return out, runner.read_jsonl(out)


def _key(r):
    c = r["config"]
    return (c["model"], c["dtype"], c["batch"], c["seq"])


def test_every_competitor_has_a_row_or_a_reason(quick):
    _, rows = quick
    want = {
        (m, "fp32", b, s, c)
        for m in QUICK_MODELS
        for b in matrix.QUICK_BATCHES
        for s in matrix.MODELS[m].seqs(None)
        for c in COMPETITORS
    }
    got = [(*_key(r), r["config"]["competitor"]) for r in rows]
    assert sorted(got) == sorted(want)
    errors = [(k, r["reason"]) for k, r in zip(got, rows, strict=True) if r["status"] == "error"]
    assert not errors, errors
    for r in rows:
        assert r["status"] in ("ok", "skipped")
        if r["status"] == "skipped":
            assert isinstance(r["reason"], str) and len(r["reason"]) > 10
    status = {(*_key(r), r["config"]["competitor"]): r["status"] for r in rows}
    for (m, _, b, _, c), st in status.items():
        if c in ("eager", "sdpa", "fastenc-torch"):
            assert st == "ok", (m, b, c)
        if c in ("fastenc-cuda", "fastenc-triton+graphs", "tensorrt"):  # all need CUDA; quick mode is the CPU
            assert st == "skipped", (m, b, c)
        if c == "onnxruntime" and _has_onnx_export():
            assert st == "ok", (m, b, c)
        if c == "fastenc-triton":  # on the CPU only through the interpreter (conftest sets it without a GPU)
            assert st == ("ok" if b == 1 and triton_interpret() else "skipped"), (m, b, c)


def test_row_fields_and_derived_figures(quick):
    _, rows = quick
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok
    for r in ok:
        assert r["device"] and r["commit"] and r["run_id"] == ok[0]["run_id"]
        for lib in ("torch", "triton", "transformers", "onnxruntime", "cuda", "python", "fastenc"):
            assert lib in r["versions"]
        c = r["config"]
        assert set(c) >= {"model", "tower", "batch", "seq", "dtype", "competitor", "layers", "full_layers"}
        assert "(1/2 layers)" in c["label"]  # the reduced depth is in the name shown everywhere
        s = r["samples_ms"]
        assert len(s) == r["iters"] == ITERS and all(x > 0 for x in s)
        assert r["p50_ms"] == percentile(s, 50) and r["p99_ms"] == percentile(s, 99)
        assert min(s) <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= max(s)
        assert r["items_per_s"] == pytest.approx(c["batch"] / (r["p50_ms"] / 1e3))
        assert r["tokens_per_s"] == pytest.approx(c["batch"] * c["seq"] / (r["p50_ms"] / 1e3))
        assert r["flops"] == matrix.forward_flops(matrix.MODELS[c["model"]], c["batch"], c["seq"]) > 0
        assert r["tflops"] == pytest.approx(r["flops"] / (r["p50_ms"] / 1e3) / 1e12)
        peak = r["peak"]
        assert peak["dtype"] == c["dtype"] and len(peak["shape"]) == 3 and peak["tflops"] > 0
        assert r["mfu"] == pytest.approx(r["tflops"] / peak["tflops"])
        assert r["setup_s"] >= 0 and r["first_call_s"] > 0 and r["throughput_items_per_s"] > 0
        assert r["peak_mem_mb"] is None or r["peak_mem_mb"] > 0
        # every competitor computed the same thing as the case's reference (eager), fp32
        assert r["check_ref"] == "eager" and r["check_max_rel"] < 1e-4, (c, r["check_max_rel"])


def test_rows_follow_the_one_row_schema(quick):
    """fastenc bench's rows are schema rows (fastenc.benchmark.rows): they validate, load and print in the table
    that every bench script's rows share."""
    from fastenc.benchmark.rows import check_row, load_rows

    out, rows = quick
    for r in rows:
        check_row(r)
        assert r["script"] == "fastenc bench" and r["competitor"] == r["config"]["competitor"]
        assert r["op"] == r["config"]["model"] and r["dtype"] == r["config"]["dtype"]
        if r["status"] == "ok":
            assert r["p20_ms"] == percentile(r["samples_ms"], 20) and r["p80_ms"] == percentile(r["samples_ms"], 80)
        else:
            assert r["samples_ms"] == [] and r["p50_ms"] is None and r["notes"] == r["reason"]
    loaded = load_rows(out)
    assert loaded == rows
    assert len(report.rows_table(loaded).splitlines()) == len(rows) + 2


def test_speedups_match_the_recorded_p50s(quick):
    _, rows = quick
    cases: dict = {}
    for r in rows:
        if r["status"] == "ok":
            cases.setdefault(_key(r), {})[r["config"]["competitor"]] = r
    assert cases
    for group in cases.values():
        for name, r in group.items():
            assert set(r["speedup_vs"]) == set(group) - {name}
            for other, x in r["speedup_vs"].items():
                assert x == pytest.approx(group[other]["p50_ms"] / r["p50_ms"])
                assert x * group[other]["speedup_vs"][name] == pytest.approx(1.0)


def test_markdown_and_png_outputs(quick):
    out, rows = quick
    md = out.with_suffix(".md").read_text()
    assert "| model | dtype | batch | seq | competitor | p50 ms" in md
    ok = [r for r in rows if r["status"] == "ok"]
    table_rows = [line for line in md.splitlines() if line.startswith("| tiny-") and " ms" not in line]
    assert len([line for line in table_rows if line.count("|") > 15]) == len(ok)
    for r in rows:
        if r["status"] != "ok":
            assert r["reason"] in md
    pngs = sorted((out.parent / "quick-plots").glob("*.png"))
    assert {p.name.split("-")[0] for p in pngs} == {"latency", "speedup"}
    assert len([p for p in pngs if p.name.startswith("latency-")]) == len(QUICK_MODELS)
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width > 100 and height > 100


def test_report_regenerates_from_jsonl(quick, tmp_path):
    out, rows = quick
    copy = tmp_path / "again.jsonl"
    copy.write_text(out.read_text() + out.read_text())  # the same rows twice: latest() keeps one per config
    assert cli.bench_main(["--report", str(copy), "--no-plots"]) == 0
    assert len(report.latest(runner.read_jsonl(copy))) == len(rows)
    assert copy.with_suffix(".md").read_text() == out.with_suffix(".md").read_text()


def test_row_budget_cuts_iterations_and_guards_the_cpu(tmp_path):
    out = tmp_path / "budget.jsonl"
    argv = ["--quick", "--models", "tiny-clip-vision", "--competitors", "sdpa", "--batch", "1", "--iters", "1000"]
    argv += ["--row-budget", "1e-6", "--out", str(out), "--no-progress", "--no-plots"]
    assert cli.bench_main(argv) == 0
    (r,) = runner.read_jsonl(out)
    assert r["status"] == "skipped" and "row budget" in r["reason"]  # the FLOPs estimate alone exceeds it
    argv[argv.index("1e-6")] = "0.02"  # the estimate fits (>= 0.4 GFLOP/s would do), 1000 calls do not
    out.unlink()
    assert cli.bench_main(argv) == 0
    (r,) = runner.read_jsonl(out)
    assert r["status"] == "ok" and r["iters_cut"], r
    assert runner.MIN_ITERS <= r["iters"] == len(r["samples_ms"]) < 1000 == r["settings"]["iters"]


@pytest.mark.parametrize("name", ["tiny-clip-text", "tiny-clip-vision", "tiny-siglip-vision", "tiny-t5"])
def test_flops_formula_matches_torch_flop_counter(name):
    from torch.utils.flop_counter import FlopCounterMode

    spec = matrix.MODELS[name]
    model = spec.build("eager", "cpu", torch.float32)
    seq = spec.seqs(None)[0]
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(**spec.inputs(3, seq, "cpu", torch.float32))
    counted = counter.get_total_flops()
    cfg = spec.config()
    if spec.family == "clip" and spec.tower == "text":  # eager computes the full causal S x S; we count half
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        counted -= 2 * 3 * cfg.num_attention_heads * seq * seq * head_dim * cfg.num_hidden_layers
    assert matrix.forward_flops(spec, 3, seq) == counted


def test_list_and_bad_names(capsys):
    assert cli.bench_main(["--list", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    for name in matrix.FULL_MODELS:
        assert matrix.MODELS[name].label in text
    assert "t5-v1_1-xxl (2/24 layers)" in text and "t5-v1_1-xl (4/24 layers)" in text
    assert cli.bench_main(["--list", "--models", "clip-vit-z"]) == 2  # bad input: one error line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("fastenc bench: error: unknown ['clip-vit-z']") and len(err.strip().splitlines()) == 1


def test_jsonl_append_keeps_earlier_rows(tmp_path):
    path = tmp_path / "r" / "rows.jsonl"
    runner.append_jsonl(path, [{"a": 1}])
    runner.append_jsonl(path, [{"a": 2}, {"b": math.inf}])
    assert runner.read_jsonl(path) == [{"a": 1}, {"a": 2}, {"b": math.inf}]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_bench_overhead_rows_and_op_counts(tmp_path):
    """bench/bench_overhead.py end to end at 3 iterations (the figures are noise here): one row per competitor with
    the ratio to SDPA, the machine's load and the note; fastenc issues 8 ops per CLIP layer (2 norms, 4 GEMMs,
    attention, activation; the final norm adds 1/12 of a norm per layer)."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "overhead.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_overhead.py"
    cmd = [sys.executable, str(script), "--iters", "3", "--warmup", "1", "--out", str(out), "--note", "test"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=900)
    rows = json.loads(out.read_text())
    names = ["transformers_eager", "transformers_sdpa", "fastenc_torch", "fastenc_triton_stub_launches"]
    assert [r["competitor"] for r in rows] == names
    for r in rows:
        assert r["note"] == "test" and r["load_avg_1m"] >= 0 and len(r["samples_ms"]) == 3
        assert math.isclose(r["ratio_vs_sdpa"], r["p50_ms"] / rows[1]["p50_ms"])
        assert r["python_calls_per_layer"] > 0
    torch_row, stub_row = rows[2], rows[3]
    ops = torch_row["fastenc_trace_ops_per_layer"]
    want = {"torch.attention": 1.0, "torch.bias_activation": 1.0, "torch.layer_norm": 25 / 12, "torch.linear": 4.0}
    assert ops == pytest.approx(want)
    assert torch_row["aten_ops_per_layer"] < rows[1]["aten_ops_per_layer"]  # fewer ops than transformers SDPA
    assert "launches replaced" in stub_row["proxy"]  # the row says it is a proxy, not a GPU measurement

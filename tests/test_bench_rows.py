"""One timing module and one row schema for every benchmark: each bench script's rows (its CPU path where it has
one, else its row builder with fixed samples) validate against fastenc.benchmark.rows and load into the same
report; the rows committed under bench/results/ (the old schema) load through the adapter."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from fastenc.benchmark import report
from fastenc.benchmark.rows import FIELDS, adapt, check_row, load_rows, make_row
from fastenc.benchmark.timing import Timer, percentile, quantiles

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SAMPLES = [3.0, 1.0, 2.0, 5.0, 4.0]  # p20 2.0, p50 3.0, p80 4.0


@pytest.fixture
def bench(monkeypatch):
    """bench/ on sys.path (the scripts `from _common import ...`), the repository too (tests.pipeline_utils)."""
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    return lambda name: importlib.import_module(name)


def _loads_in_report(rows: list[dict], tmp_path: Path) -> None:
    """Every row validates, survives a JSON round trip through load_rows and gives one line of report.rows_table."""
    for r in rows:
        check_row(r)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_rows(path)
    assert len(loaded) == len(rows)
    for r in loaded:
        check_row(r)
    text = report.rows_table(loaded)
    assert len(text.strip().splitlines()) == len(rows) + 2


def test_percentile_is_nearest_rank_on_the_0_to_100_scale():
    assert percentile(SAMPLES, 0) == 1.0 and percentile(SAMPLES, 100) == 5.0 and percentile(SAMPLES, 50) == 3.0
    assert quantiles(SAMPLES) == {"p20_ms": 2.0, "p50_ms": 3.0, "p80_ms": 4.0}


def test_make_row_carries_every_field_and_the_samples_quantiles():
    r = make_row("bench_x", "op", "impl", samples_ms=SAMPLES, config={"N": 4}, dtype="fp16", device="cpu", extra=1)
    assert set(FIELDS) <= set(r) and r["extra"] == 1
    assert (r["p20_ms"], r["p50_ms"], r["p80_ms"]) == (2.0, 3.0, 4.0) and r["samples_ms"] == SAMPLES
    check_row(r)
    with pytest.raises(ValueError, match="p50"):
        check_row({**r, "p50_ms": 9.0})
    with pytest.raises(ValueError, match="competitor"):
        check_row({k: v for k, v in r.items() if k != "competitor"})


def test_budget_samples_are_sized_by_time():
    timer = Timer(torch.device("cpu"))
    samples = timer.budget_samples(lambda: time.sleep(0.002), warmup_ms=4, rep_ms=20)
    assert 2 <= len(samples) <= 10 and min(samples) >= 2.0
    wall, cpu = timer.once_cpu(lambda: time.sleep(0.002))  # a sleeping thread spends wall time, not CPU time
    assert wall >= 2.0 and cpu < wall


@pytest.mark.parametrize("path", sorted(p.name for p in RESULTS.glob("*.json*") if not p.name.startswith("static")))
def test_committed_results_load_into_the_report(path, tmp_path):
    rows = load_rows(RESULTS / path)
    assert rows
    for r in rows:
        check_row(r)
        assert r["script"] != "unknown" and r["op"] and r["competitor"] and r["p50_ms"] is not None
    _loads_in_report(rows, tmp_path)
    raw = json.loads((RESULTS / path).read_text()) if path.endswith(".json") else None
    if raw:  # the adapter keeps every old field
        assert all(set(old) <= set(adapt(dict(old))) for old in raw)


def test_gpu_only_scripts_rows_validate(bench, tmp_path):
    """The kernel and model scripts exit 2 without CUDA: their rows through the same builders, fixed samples."""
    common = bench("_common")
    kenv = {"gpu": "GPU", "torch": "2", "triton": "3", "cuda": "12", "commit": "abc"}
    meta = {"device": "GPU", "torch": "2", "triton": "3", "transformers": "5", "fastenc": "0", "python": "3"}
    meta.update(commit="abc", time="t")
    shape = {"rows": 4, "N": 8}
    rows = [
        common.kernel_row("bench_norm", kenv, "layer_norm", "fastenc", SAMPLES, mode="forward", config=shape),
        common.kernel_row("bench_activation", kenv, "bias_activation", "torch", notes="refused", error="refused"),
        common.kernel_row("bench_contrastive", kenv, "clip_loss", "fastenc", SAMPLES, config={"N": 8, "d": 4}),
        common.model_row("bench_clip", meta, "clip-text", "fastenc-triton", SAMPLES, config={"batch": 1}),
        common.model_row("bench_t5", meta, "t5-encoder", "transformers-sdpa", SAMPLES, dtype="bf16"),
        common.model_row("bench_graphs", meta, "clip-text", "fastenc-graphs", SAMPLES, batch=1),
    ]
    assert rows[0]["provider"] == rows[0]["competitor"] == "fastenc" and rows[0]["commit"] == "abc"
    assert rows[3]["versions"]["transformers"] == "5" and rows[3]["device"] == "GPU"
    _loads_in_report(rows, tmp_path)


def test_bench_training_cpu_rows(bench, tmp_path):
    out = tmp_path / "training.json"
    argv = ["--tiny", "--cases", "t5", "--iters", "2", "--device", "cpu", "--out", str(out)]  # clip: same rows
    assert bench("bench_training").main(argv) == 0
    rows = json.loads(out.read_text())
    assert {r["provider"] for r in rows} == {"transformers", "fastenc"}
    assert all(r["script"] == "bench_training" and len(r["samples_ms"]) == 2 for r in rows)
    _loads_in_report(rows, tmp_path)


def test_bench_onnx_cpu_rows(bench, tmp_path):
    out = tmp_path / "onnx.json"
    argv = ["--models", "clip-text", "--clip-shape", "tiny", "--clip-layers", "1", "--clip-seq", "8", "--batch", "1"]
    argv += ["--providers", "torch-eager", "torch-sdpa", "--warmup", "0", "--iters", "3", "--out", str(out)]
    assert bench("bench_onnx").main(argv) == 0
    rows = json.loads(out.read_text())
    assert [r["competitor"] for r in rows] == ["torch-eager", "torch-sdpa"]
    _loads_in_report(rows, tmp_path)


def test_bench_pipelines_cpu_rows(bench, tmp_path):
    out = tmp_path / "pipelines.jsonl"
    argv = ["--families", "sd", "--batch", "1", "--iters", "2", "--warmup", "0", "--out", str(out)]
    assert bench("bench_pipelines").main(argv) == 0
    rows = load_rows(out)
    assert {r["competitor"] for r in rows} >= {"eager", "fastenc", "fingerprint (all encoders)"}
    assert all(r["script"] == "fastenc bench --pipeline" and r["bench"] == "encode_prompt" for r in rows)
    _loads_in_report(rows, tmp_path)


def test_bench_embed_cpu_rows(bench, tmp_path):
    be = bench("bench_embed")
    rows: list[dict] = []
    argv = ["--shape", "tiny", "--images", "4", "--px", "32", "32", "--batch", "2", "--iters", "2", "--workers", "1"]
    argv += ["--device", "cpu", "--no-baseline", "--work", str(tmp_path / "work")]
    be.run(be.parser().parse_args(argv), sink=lambda r: rows.append({"commit": "abc", **r}))  # as the GPU session
    assert {"model-only", "fastenc"} <= {r["provider"] for r in rows}
    assert all(r["script"] == "bench_embed" and r["samples_per_s"] > 0 and r["commit"] == "abc" for r in rows)
    _loads_in_report(rows, tmp_path)


def test_report_plot_or_table_only(tmp_path, monkeypatch):
    rows = load_rows(RESULTS / "pipelines_cpu.jsonl")
    png = report.rows_plot(rows, tmp_path / "p.png")
    if importlib.util.find_spec("matplotlib") is None:
        assert png is None
    else:
        assert png.read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed: no plot, the table still prints
    assert report.rows_plot(rows, tmp_path / "q.png") is None and not (tmp_path / "q.png").exists()
    assert report.report_cli([str(RESULTS / "pipelines_cpu.jsonl"), "--plot", str(tmp_path / "q.png")]) == 0

"""The package surface and the command line: `fastenc.<subpackage>` after a bare `import fastenc` (lazily, without
onnx), and every `fastenc` subcommand's bad input ending in one `fastenc <sub>: error: ...` line and exit status 2,
never a traceback."""

import json
import os
import subprocess
import sys

import pytest

import fastenc
from fastenc import cli

SUBPACKAGES = ("export", "ops", "models", "distributed", "diagnostics", "runtime", "embed", "train")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **env})  # fmt: skip


# ------------------------------------------------------------------------------------------ package attributes


def test_subpackages_are_attributes_without_importing_onnx():
    code = """
import json, sys
import fastenc
heavy = sorted(m for m in ("onnx", "onnxruntime", "fastenc.export", "fastenc.diagnostics", "fastenc.runtime",
                           "fastenc.embed", "fastenc.train", "pyarrow", "ray") if m in sys.modules)
listed = [n for n in ("export", "ops", "models", "distributed", "diagnostics", "runtime", "embed", "train")
          if n in dir(fastenc)]
ok = {
    "export": callable(fastenc.export.to_onnx) and callable(fastenc.export.to_triton_repository),
    "ops": callable(fastenc.ops.attention),
    "models": hasattr(fastenc.models, "FUSED_CLASSES"),
    "distributed": callable(fastenc.distributed.clip_loss),
    "diagnostics": callable(fastenc.diagnostics.token_report),
    "runtime": callable(fastenc.runtime.load),
    "embed": hasattr(fastenc, "embed"),
    "train": callable(fastenc.train.finetune),
}
print(json.dumps({"heavy_at_import": heavy, "listed": listed, "ok": ok}))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["heavy_at_import"] == [], "import fastenc must not import these"
    assert got["listed"] == list(SUBPACKAGES)
    assert got["ok"] == dict.fromkeys(SUBPACKAGES, True)


def test_unknown_attribute_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        fastenc.nosuch  # noqa: B018
    assert {"export", "diagnostics"} <= set(fastenc.__all__)


# --------------------------------------------------------------------------------------------------- CLI errors


def run(argv, capsys) -> tuple[int, str]:
    """fastenc.cli.main(argv) -> (exit status, stderr); argparse's own errors exit through SystemExit."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    return code, err


def assert_one_error_line(code, err, command, message):
    assert code == 2, (code, err)
    # what a terminal shows: a progress bar redraws its line with \r and erases it when the command fails
    lines = [line.split("\r")[-1] for line in err.split("\n")]
    lines = [line for line in lines if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"fastenc {command}: error: "), err
    assert message in lines[0], err


@pytest.fixture
def empty_dir(tmp_path):
    d = tmp_path / "no_config"
    d.mkdir()
    (d / "notes.txt").write_text("a folder without config.json")
    return d


def test_every_subcommand_reports_bad_input_in_one_line(empty_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FASTENC_BACKEND", raising=False)
    bad_config = tmp_path / "bad_config"  # a config.json transformers cannot use
    bad_config.mkdir()
    (bad_config / "config.json").write_text('{"model_type": "nosuch-architecture"}')
    tiny = ["--shape", "tiny", "--layers", "1", "--batch", "1", "--backend", "torch"]
    cases = [
        (["demo", "--shape", "nosuch"], "demo", "invalid choice: 'nosuch'"),
        (["demo", *tiny, "--device", "nosuch"], "demo", "--device 'nosuch' is not a device"),
        (["demo", *tiny, "--device", "meta"], "demo", "fastenc runs on cpu or cuda"),
        (["demo", *tiny, "--seq", "0"], "demo", "--seq must be >= 1, got 0"),
        (["demo", *tiny, "--seq", "78"], "demo", "--seq 78 is longer than the model's 77 text positions"),
        (["demo", "--shape", "tiny", "--batch", "0"], "demo", "--batch must be >= 1"),
        (["demo", "--shape", "tiny", "--layers", "0"], "demo", "--layers must be >= 1"),
        (["parity"], "parity", "--model PATH is required"),
        (["parity", "--model", str(empty_dir), "--backend", "torch"], "parity", "has no config.json"),
        (["parity", "--model", str(bad_config), "--backend", "torch"], "parity", "could not be loaded"),
        (["parity", "--model", str(tmp_path / "missing"), "--backend", "torch"], "parity", "is not a directory"),
        (["probe", "--model", str(empty_dir), "--text-only", "--prompt", "a cat"], "probe", "has no config.json"),
        (["probe", "--model", str(bad_config), "--text-only", "--prompt", "a cat"], "probe", "could not be loaded"),
        (["export", "--model", str(empty_dir), "--out", str(tmp_path / "m.onnx")], "export", "has no config.json"),
        (["probe", "--model", str(empty_dir), "--text-only", "--prompt", "a cat", "--device", "nosuch"], "probe",
         "is not a device"),
        (["bench", "--report", str(tmp_path / "missing.jsonl")], "bench", "--report"),
        (["bench", "--list", "--models", "nosuch"], "bench", "unknown ['nosuch']"),
        (["bench", "--list", "--device", "nosuch"], "bench", "is not a device"),
        (["tokens", "--tokenizer", str(tmp_path / "missing"), "a cat"], "tokens", "does not exist"),
        (["export", "--shape", "tiny"], "export", "--out"),
        (["export", "--shape", "nosuch", "--out", str(tmp_path / "m.onnx")], "export", "invalid choice"),
        (["export", "--model", str(bad_config), "--out", str(tmp_path / "m.onnx")], "export", "could not be loaded"),
    ]  # fmt: skip
    for argv, command, message in cases:
        code, err = run(argv, capsys)
        assert_one_error_line(code, err, command, message)
    (tmp_path / "empty.jsonl").write_text("\n")
    assert_one_error_line(*run(["bench", "--report", str(tmp_path / "empty.jsonl")], capsys), "bench", "no rows")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    assert_one_error_line(*run(["bench", "--report", str(tmp_path / "bad.jsonl")], capsys), "bench", "not readable")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_device_on_a_machine_without_one(capsys):
    for argv in (["demo", "--shape", "tiny", "--device", "cuda"], ["bench", "--list", "--device", "cuda:0"]):
        code, err = run(argv, capsys)
        assert_one_error_line(code, err, argv[0], "use --device cpu")


def test_bogus_backend_variable_is_one_error_line(monkeypatch, capsys):
    monkeypatch.setenv("FASTENC_BACKEND", "bogus")
    code, err = run(["demo", "--shape", "tiny", "--layers", "1", "--batch", "1"], capsys)
    assert_one_error_line(code, err, "demo", "$FASTENC_BACKEND must be one of")
    assert "'bogus'" in err


def test_demo_seq_is_honoured(capsys, monkeypatch):
    monkeypatch.delenv("FASTENC_BACKEND", raising=False)
    code = cli.main(["demo", "--shape", "tiny", "--layers", "1", "--batch", "2", "--seq", "5", "--backend", "torch",
                     "--device", "cpu", "--json"])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"]
    shapes = {f["name"]: f["shape"] for f in report["fields"]}
    assert shapes["text_model_output.last_hidden_state"] == [2, 5, 64]


def test_errors_through_the_console_entry_point(tmp_path):
    """The real process: no traceback, exit status 2, for argparse errors and for the backend variable alike."""
    for argv, env, message in (
        (["demo", "--shape", "nosuch"], {}, "invalid choice"),
        (["demo", "--shape", "tiny", "--layers", "1", "--batch", "1"], {"FASTENC_BACKEND": "bogus"}, "bogus"),
        (["bench", "--report", str(tmp_path / "missing.jsonl")], {}, "is not a file"),
    ):
        proc = subprocess.run([sys.executable, "-m", "fastenc.cli", *argv], capture_output=True, text=True,
                              timeout=900, env={**os.environ, **env})  # fmt: skip
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(f"fastenc {argv[0]}: error: "), proc.stderr


# ------------------------------------------------------------------------------- the demo says what it did (#25)


def test_ran_backend_reads_the_trace():
    from fastenc.parity import ran_backend

    assert ran_backend({"onnxruntime.export": 1, "onnxruntime.forward": 1}) == "onnxruntime"
    assert ran_backend({"torch.linear": 8, "triton.attention": 2, "triton.layer_norm": 4}) == "triton"
    assert ran_backend({"torch.linear": 8, "triton.attention": 1, "torch.attention": 1}) == "torch+triton"
    assert ran_backend({"torch.linear": 4, "torch.module": 1}) == "torch"
    assert ran_backend({}) == "none"


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_demo_parity_header_names_the_backend_that_ran(backend, capsys, monkeypatch, tmp_path):
    """Issue 25: the header said backend=torch while ONNX Runtime ran every op; it is read from fastenc.trace()."""
    monkeypatch.delenv("FASTENC_BACKEND", raising=False)
    monkeypatch.setenv("FASTENC_CACHE", str(tmp_path))
    argv = ["demo", "--shape", "tiny", "--layers", "1", "--batch", "2", "--device", "cpu", "--speed-calls", "0"]
    assert cli.main([*argv, "--backend", backend]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("parity of "))
    assert header.endswith(f"backend={backend}:"), header
    assert f"{backend}." in out  # the op table agrees
    assert cli.main([*argv, "--backend", backend, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backend"] == backend and report["requested"] == backend
    if backend == "onnxruntime":
        assert set(report["ops"]) <= {"onnxruntime.forward", "onnxruntime.export"}


def test_demo_timing_loop_reports_progress_on_stderr(capsys, monkeypatch, tmp_path):
    """Issue 25: the demo's timing loop printed nothing for 14 minutes under load. Progress goes to stderr (first
    calls, warm-up, rounds); stdout still ends with the speed line."""
    monkeypatch.delenv("FASTENC_BACKEND", raising=False)
    monkeypatch.setenv("FASTENC_CACHE", str(tmp_path))
    argv = ["demo", "--shape", "tiny", "--layers", "1", "--batch", "2", "--backend", "torch", "--device", "cpu"]
    assert cli.main([*argv, "--speed-calls", "3"]) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert any(line.startswith("fastenc demo: fastenc candidate 1/") and "ready in" in line for line in err), err
    assert any(line.startswith("fastenc demo: warm-up: ") for line in err), err
    assert "fastenc demo: timing 3 interleaved round(s) of 3 competitors" in err, err
    rounds = [line for line in err if line.startswith("fastenc demo: round ")]
    assert rounds[0].startswith("fastenc demo: round 1/3: p50 so far transformers eager ") and "round 3/3" in rounds[-1]
    assert captured.out.strip().splitlines()[-1].startswith("speed (CPU, "), captured.out


def test_speed_report_progress_callback(monkeypatch):
    import torch
    from transformers import CLIPTextModel

    import fastenc.core.dispatch as dispatch
    from fastenc.benchmark.speed import speed_report
    from fastenc.models.configs import clip_config
    from fastenc.parity import clip_inputs

    torch.manual_seed(0)
    model = CLIPTextModel(clip_config("tiny", layers=1).text_config).eval()
    fast = fastenc.optimize(model, backend="torch")
    inputs = clip_inputs(model.config, 2, seq=8)
    with pytest.raises(fastenc.InputError, match="progress"):
        speed_report(model, inputs, fast=fast, calls=1, progress="stderr")
    monkeypatch.setattr(dispatch, "onnxruntime_installed", lambda: False)  # the torch candidate only: no export
    lines = []
    rep = speed_report(model, inputs, fast=fast, calls=2, progress=lines.append)
    assert rep["calls"] == 2
    assert lines[0] == "fastenc candidate 1/1: first calls (may export to ONNX, compile or capture)"
    assert [line.split(":")[0] for line in lines if line.startswith("round ")] == ["round 1/2", "round 2/2"]


def test_fastenc_warnings_are_one_line_in_the_cli(monkeypatch, capsys, recwarn):
    """A fastenc warning raised while a subcommand runs (a fall-back, a cache write) is one `fastenc <cmd>: Kind: ...`
    line on stderr, not Python's `file:line: Kind: ...` plus a source line; other libraries' warnings keep theirs."""
    import warnings

    import fastenc.cli as cli
    from fastenc import FallbackWarning

    def fake_parity(args):
        msg = "fastenc: the ONNX export failed\n  (ValueError: x);\n running torch"
        warnings.warn(msg, FallbackWarning, stacklevel=1)
        warnings.warn("a library's own warning", DeprecationWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(cli, "cmd_parity", fake_parity)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main(["demo"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "fastenc demo: FallbackWarning: the ONNX export failed (ValueError: x); running torch" in err
    assert not any("test_cli.py" in line and "FallbackWarning" in line for line in err)
    assert [str(w.message) for w in recwarn if w.category is DeprecationWarning] == ["a library's own warning"]

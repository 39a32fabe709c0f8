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

SUBPACKAGES = ("export", "ops", "models", "distributed", "diagnostics")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})  # fmt: skip


# ------------------------------------------------------------------------------------------ package attributes


def test_subpackages_are_attributes_without_importing_onnx():
    code = """
import json, sys
import fastenc
heavy = sorted(m for m in ("onnx", "onnxruntime", "fastenc.export", "fastenc.diagnostics") if m in sys.modules)
listed = [n for n in ("export", "ops", "models", "distributed", "diagnostics") if n in dir(fastenc)]
ok = {
    "export": callable(fastenc.export.to_onnx) and callable(fastenc.export.to_triton_repository),
    "ops": callable(fastenc.ops.attention),
    "models": hasattr(fastenc.models, "FUSED_CLASSES"),
    "distributed": callable(fastenc.distributed.clip_loss),
    "diagnostics": callable(fastenc.diagnostics.token_report),
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

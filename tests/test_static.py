"""The static GPU report (bench/static_report.py): every Triton kernel compiled for sm_90a and sm_80 on this CPU
machine, registers / stack (spill) bytes / shared memory from the cubin.

1. the committed report (bench/results/static-sm90.json) was generated from the current kernels/*.py;
2. it holds rows of both compilers users get (triton 3.6 on the GPU machine, 3.9 in CI and fresh installs);
3. a representative subset compiles now under the installed triton (`--matrix ci`: attention fp16 with key
   padding + causal and key padding + T5 relative bias at hd 64/80/128, every config the pruner may keep; a
   LayerNorm, an RMSNorm, a bias activation and a gated activation), for sm_90a and sm_80: no compile error, ever,
   and no spill (stack > 0) in a config the autotuner may pick.

The compile runs in a subprocess without TRITON_INTERPRET (conftest sets it on a CPU machine, and under it
@triton.jit builds interpreted functions, which cannot be compiled).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "static_report.py"


def _load():
    """bench/ is not a package: the script is imported from its path."""
    spec = importlib.util.spec_from_file_location("static_report_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


static = _load()
REPORT = REPO / static.DEFAULT_JSON
COMPILERS = ("3.6", "3.9")
SUBSET_TIMEOUT_S = 900  # the subset takes ~1-2 min on 2 idle cores; a shared CI host is several times slower
REGENERATE = (
    "regenerate from the repo root, both compilers in one command (3.9 here, then 3.6; ~5 min on 2 idle cores):\n"
    "    python bench/static_report.py --also .venv-triton36/bin/python\n"
    "(--also takes any python with triton==3.6.*, torch==2.13.0, numpy<2.4, transformers and "
    "`pip install --no-deps -e .`; each run replaces only its own triton version's rows)"
)

# Selectable configs known to spill today (triton minor, arch, op, variant, config): the kernels are being
# restructured to remove these register spills. Only test_subset_no_spill_in_selectable_configs reads this list; an
# entry here turns exactly that spill into an expected failure, any other spill still fails. Remove the entries
# once the kernel fix lands.
# Measured 2026-11-30 19:55 UTC on kernels/*.py sha256 2f4cd22d6b30 (triton 3.6: no spill in the subset).
KNOWN_SPILLS: set[tuple[str, str, str, str, str]] = {
    ("3.9", "sm_80", "attention", "fp16 hd128 causal+kpm", "128x64 w8 s3"),  # 32 bytes
    ("3.9", "sm_80", "attention", "fp16 hd80 causal+kpm", "128x64 w8 s3"),  # 8 bytes
}


def _report() -> dict:
    if not REPORT.exists():
        pytest.fail(f"{REPORT} is missing; {REGENERATE}")
    return json.loads(REPORT.read_text())


def test_report_is_current_for_kernel_sources():
    report = _report()
    current = static.kernel_sources_digest()
    stale = {
        minor: v["kernel_sources_sha256"][:12]
        for minor, v in report["versions"].items()
        if v["kernel_sources_sha256"] != current["sha256"]
    }
    changed = sorted(
        name
        for name in set(current["files"]) | set(report["kernel_sources"]["files"])
        if current["files"].get(name) != report["kernel_sources"]["files"].get(name)
    )
    assert not stale, (
        f"{REPORT.relative_to(REPO)} is stale: kernels/*.py hash {current['sha256'][:12]}, the report's rows of "
        f"triton {sorted(stale)} were made from {stale} (files changed since the last run: {changed or '?'}); "
        f"{REGENERATE}"
    )


def test_report_has_rows_of_both_compilers():
    report = _report()
    for minor in COMPILERS:
        rows = [r for r in report["rows"] if r["triton"] == minor]
        assert rows, f"no triton {minor} rows in {REPORT.relative_to(REPO)}; {REGENERATE}"
        assert minor in report["versions"], f"no triton {minor} version record; {REGENERATE}"
        assert {r["arch"] for r in rows} == {"sm_90a", "sm_80"}, f"triton {minor}: rows of both archs expected"
        families = {r["family"] for r in rows}
        for fam in ("attention", "layer_norm", "rms_norm", "bias_activation", "gated_activation", "cosine",
                    "contrastive_stats", "contrastive_grads"):  # fmt: skip
            assert fam in families, f"triton {minor}: no {fam} rows; {REGENERATE}"
        for r in rows:
            for field in ("kernel", "variant", "config", "status", "registers", "stack", "shared", "fits",
                          "selectable"):  # fmt: skip
                assert field in r, f"row without {field}: {r}"


@pytest.fixture(scope="module")
def subset():
    """Rows of `python bench/static_report.py --matrix ci` under the installed triton."""
    pytest.importorskip("triton")
    if static.cuobjdump_path() is None:
        pytest.skip("cuobjdump not found (triton/backends/nvidia/bin/ or PATH): resource usage cannot be read")
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"fastenc-static-ci-{os.getpid()}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(SCRIPT), "--matrix", "ci", "--json", str(out), "--fresh",
           "--no-md", "--jobs", "2"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=SUBSET_TIMEOUT_S)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    try:
        rows = json.loads(out.read_text())["rows"]
    finally:
        out.unlink(missing_ok=True)
    print(f"static subset: {len(rows)} compiles in {wall:.0f} s")
    return rows


def _label(r) -> tuple[str, str, str, str, str]:
    return (r["triton"], r["arch"], r["family"], r["variant"], static._config_label(r["config"]))


def test_subset_compiles_for_sm90_and_sm80(subset):
    errors = [f"{_label(r)}: {r['status']}" for r in subset if r["status"] != "ok"]
    assert not errors, "compile errors:\n" + "\n".join(errors)
    assert {r["arch"] for r in subset} == {"sm_90a", "sm_80"}
    assert {r["family"] for r in subset} >= {"attention", "layer_norm", "rms_norm", "bias_activation"}
    attn = {(r["variant"], r["arch"]) for r in subset if r["family"] == "attention"}
    for hd in static.CI_HEAD_DIMS:
        for variant in ("causal+kpm", "kpm+relbias"):
            for arch in ("sm_90a", "sm_80"):
                assert (f"fp16 hd{hd} {variant}", arch) in attn
    too_big = [f"{_label(r)}: {r['fits_reason']}" for r in subset if r["selectable"] and not r["fits"]]
    assert not too_big, "selectable configs that cannot launch:\n" + "\n".join(too_big)


def test_subset_no_spill_in_selectable_configs(subset):
    spills = {_label(r): r["stack"] for r in static.spilling(subset)}
    unexpected = {k: v for k, v in spills.items() if k not in KNOWN_SPILLS}
    assert not unexpected, "selectable configs spill (stack bytes):\n" + "\n".join(
        f"{k}: {v}" for k, v in sorted(unexpected.items())
    )
    if spills:
        pytest.xfail(
            f"{len(spills)} known spills (KNOWN_SPILLS, awaiting the kernel fix): "
            + "; ".join(f"{k}: {v} B" for k, v in sorted(spills.items()))
        )

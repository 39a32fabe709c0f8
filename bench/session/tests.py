"""Phase tests: pytest -m gpu, then the Triton-on-CUDA test files (fp16/bf16/fp32 as the tests parametrize them);
no -x, a per-test timeout where pytest-timeout is installed; one row per test as it finishes (session/pytest_plugin.py
writes them from inside that pytest)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from .common import CHILD_PROCS, ENV_STEP, HERE, PYTEST_LOG, REPO, Phase, Step, read_rows

# pytest selections: first what is marked gpu, then the files whose tests run on CUDA when it is there (conftest:
# DEVICE = "cuda"): Triton kernels on CUDA, CUDA graphs, torch.compile / opcheck, the towers.
CUDA_TEST_FILES = (
    "tests/test_graphs.py",
    "tests/test_library.py",
    "tests/test_attention.py",
    "tests/test_norm.py",
    "tests/test_activation.py",
    "tests/test_contrastive.py",
    "tests/test_cosine.py",
    "tests/test_clip.py",
    "tests/test_siglip.py",
    "tests/test_t5.py",
    "tests/test_hf_attention.py",
    "tests/test_stacks.py",
    "tests/test_attention_backward.py",  # last: the fused backward kernels (new, autotuned per shape on first use)
    "tests/test_norm_backward.py",
    "tests/test_activation_backward.py",
)
STEPS = (
    Step(
        "gpu-marked",
        35,
        15,
        {
            "args": ["-m", "gpu", "tests"],
            "dry_args": ["-m", "gpu", "-k", "norm_strided or fully_masked", "tests/test_cuda_ops.py"],
            "max_s": 60,  # at most half the phase: the Triton-on-CUDA files get the rest
        },
    ),
    Step(
        "triton-on-cuda",
        45,
        10,
        {
            "args": ["-m", "not gpu and not slow", *CUDA_TEST_FILES],
        },
        dry=False,  # the same code as gpu-marked with other pytest arguments; a second pytest start costs ~15 s
    ),
)


def run(s) -> None:
    import importlib.util

    log = s.out / PYTEST_LOG
    has_timeout = importlib.util.find_spec("pytest_timeout") is not None

    def run_step(s, step):
        args = step.spec["dry_args" if s.dry else "args"]
        left = min(s.remaining() - 2, step.spec.get("max_s", float("inf")))
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rfE",
            "--tb=short",
            "-p",
            "no:cacheprovider",
            "-p",
            "session.pytest_plugin",
            "--continue-on-collection-errors",  # a test file that cannot import here costs its tests, not the run
            *args,
        ]
        if has_timeout:
            cmd[3:3] = ["--timeout", "60" if not s.dry else "120"]
        env = dict(os.environ, **{ENV_STEP: step.name})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        s.row(
            "pytest",
            status="start",
            cmd=cmd[1:],
            per_test_timeout=has_timeout,
            reason=None if has_timeout else "pytest-timeout not installed: no per-test timeout, phase timeout only",
        )
        t0 = time.perf_counter()
        with log.open("a") as f:
            f.write(f"\n===== step {step.name}: {' '.join(cmd[1:])}\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            CHILD_PROCS.append(proc)
            s.row("pytest", status="running", pgid=proc.pid)  # the parent ends this group if the child dies first
            try:
                rc, status = proc.wait(timeout=max(1.0, left)), "ok"
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                rc, status = proc.wait(), "timeout"
            CHILD_PROCS.remove(proc)
        tests = [
            r
            for r in read_rows(s.rows_path)
            if r.get("kind") == "test" and r.get("step") == step.name and r.get("session") == s.session_id
        ]
        counts: dict[str, int] = {}
        for r in tests:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        # pytest exit codes: 0 all passed, 1 some failed, 5 nothing collected (e.g. no gpu-marked tests)
        if status == "ok" and rc not in (0, 1, 5):
            status = "error"
        s.row(
            "pytest",
            status=status,
            rc=rc,
            wall_s=time.perf_counter() - t0,
            counts=counts,
            reason=f"killed at the phase deadline after {len(tests)} results" if status == "timeout" else None,
        )

    s.run_steps(run_step)


def summary(rows: list[dict]) -> list[str]:
    tests = [r for r in rows if r.get("kind") == "test"]
    if not tests and not any(r.get("phase") == "tests" and r.get("kind") == "phase" for r in rows):
        return []
    counts: dict[str, int] = {}
    for r in tests:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    lines = ["## Tests", "", "Results: " + (", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "none")]
    bad = failures(rows)
    for r in bad[:60]:
        lines.append(f"- {r['outcome']}: `{r['nodeid']}` ({r['when']}): {r.get('message')}")
    if len(bad) > 60:
        lines.append(f"- ... {len(bad) - 60} more in gpu_session.jsonl")
    return [*lines, ""]


def failures(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("kind") == "test" and r["outcome"] in ("failed", "error")]


PHASE = Phase(
    "tests",
    "GPU correctness: pytest -m gpu, then the Triton-on-CUDA files (no -x, per-test timeout)",
    120,
    STEPS,
    run,
    summary,
    failures,
)

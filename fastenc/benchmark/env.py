"""Run metadata shared by every benchmark: git commit, library versions, device name, host memory.

Also imported by bench/_common.py, so the per-op bench scripts and `fastenc bench` record the same fields.
"""

from __future__ import annotations

import importlib
import platform
import subprocess
import time
from pathlib import Path

# the source checkout this package was imported from, when it was (an installed wheel has no bench/ next to it)
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def git_commit(*, dirty: bool = True, cwd: Path | None = SOURCE_ROOT) -> str:
    """HEAD's sha, or "unknown" where git fails.

    dirty=True appends "-dirty" when `git status --porcelain` reports changes. cwd: where git runs (None: the
    current directory)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        commit = sha.stdout.strip()
        if dirty:
            status = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True)
            commit += "-dirty" if status.stdout.strip() else ""
        return commit
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:  # noqa: BLE001 (any import failure means "not usable here")
        return None


def versions() -> dict:
    """Versions of everything a benchmark row depends on; None for a library that is not installed."""
    import torch

    import fastenc

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "onnxruntime": _version("onnxruntime"),
        "onnx": _version("onnx"),
        "tensorrt": _version("tensorrt"),
        "fastenc": fastenc.__version__,
        "fastenc_backends": fastenc.available_backends(),
    }


def device_info(device) -> dict:
    """Name and kind of `device` (a torch.device): the GPU's name, or the CPU model and visible core count."""
    import os

    import torch

    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {
            "kind": "cuda",
            "name": torch.cuda.get_device_name(device),
            "capability": list(torch.cuda.get_device_capability(device)),
            "memory_gb": round(p.total_memory / 2**30, 1),
            "tf32": torch.backends.cuda.matmul.allow_tf32,
        }
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"kind": "cpu", "name": name, "cores": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads()}


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# Host memory high-water mark: Linux lets a process reset its own VmHWM by writing "5" to /proc/self/clear_refs.
_STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_rss_peak() -> str | None:
    """Reset the process's resident-set high-water mark; None on success, else why it cannot be measured."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as e:
        return f"cannot reset the RSS high-water mark ({e.__class__.__name__}: {e})"
    if _status_kb("VmHWM") is None:
        return "no VmHWM in /proc/self/status"
    return None


def rss_peak_mb() -> float | None:
    """VmHWM (the RSS high-water mark since the last reset_rss_peak) in MiB, None where unavailable."""
    kb = _status_kb("VmHWM")
    return None if kb is None else kb / 1024


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024

"""What every part of the GPU session shares: file names, environment variables, the plan's dataclasses, the
JSONL row writer / reader, importing fastenc from a checkout, loading a carried CUDA ops library."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]  # bench/
REPO = HERE.parent
ENTRY = HERE / "gpu_session.py"  # what the parent runs for each phase's child
ROWS_FILE = "gpu_session.jsonl"
SUMMARY_FILE = "gpu_session.md"
PYTEST_LOG = "pytest.log"
SESSION_LOG = "session.log"
LOG_KEEP_BYTES = 2 * 2**20  # the logs are trimmed to their last 2 MiB at the end (the tool returns <= 16 MiB a file)

DEVICE_CALL_S = 540  # one device call of at most 9 minutes: the plan's estimates must fit it
DEFAULT_DEADLINE_S = 510  # the whole run, parent included; call the device tool with timeout_s ~560
SUMMARY_RESERVE_S = 5  # kept back from the last child for the summary
CHILD_START_S = 8  # estimated start of a child on the GPU machine (python, torch, transformers, CUDA context)
DRY_CHILD_START_S = 6
MAX_RESTARTS = 2  # a phase whose child crashes is restarted at most this often, on the steps not reached
PREBUILT_DIR = REPO / ".cuda-prebuilt"
PREBUILT_NAME = "fastenc_cuda_prebuilt"
ENV_ROWS = "FASTENC_SESSION_ROWS"  # the JSONL file, for the pytest plugin (session/pytest_plugin.py)
ENV_STEP = "FASTENC_SESSION_STEP"
ENV_PREBUILT = "FASTENC_SESSION_PREBUILT"  # the carried library, when one is used
ENV_META = "FASTENC_SESSION_META"  # JSON: session id, commit, dry_run (stamped on the plugin's rows)
ENV_FAULT = "FASTENC_SESSION_FAULT"  # test hook: "phase/step:crash" or "phase/step:hang", comma-separated

CHILD_PROCS: list = []  # subprocesses a child started (pytest): killed with it on SIGTERM


@dataclass(frozen=True)
class Step:
    """One unit of a phase: skipped when the phase's time left is below est_s (dry_est_s in a dry run)."""

    name: str
    est_s: float
    dry_est_s: float
    spec: dict = field(default_factory=dict, hash=False, compare=False)
    dry: bool = True  # part of the dry run (False: recorded there as skipped, e.g. more points of a grid)


@dataclass(frozen=True)
class Phase:
    """One phase: run(session) in its own child process; summary(rows) -> its Markdown lines; failures(rows) ->
    the rows it adds to the summary's "What failed" beyond the error / timeout rows every phase gets."""

    name: str
    title: str
    budget_s: float  # the child is killed after this (or at the overall deadline, whichever is first)
    steps: tuple[Step, ...]
    run: Callable = field(compare=False)
    summary: Callable | None = field(default=None, compare=False)
    failures: Callable | None = field(default=None, compare=False)

    def est(self, dry: bool) -> float:
        start = DRY_CHILD_START_S if dry else CHILD_START_S
        return start + sum(s.dry_est_s if dry else s.est_s for s in self.steps if s.dry or not dry)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def append_row(path: Path, row: dict, *, sync: bool = False) -> None:
    """One JSON line, written with one write() on an O_APPEND descriptor: concurrent writers (the child and its
    pytest) never interleave within a line, and killing the writer loses nothing already written (the data is in
    the kernel's page cache). sync=True also fsyncs (the parent's phase and session rows)."""
    data = (json.dumps(row, default=str, allow_nan=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_rows(path: Path) -> list[dict]:
    """Every complete JSON line of `path` (a line cut short by a kill is dropped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def short(e: BaseException, limit: int = 600) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cmd(argv: list[str], timeout: float = 20) -> str | None:
    """The output of a command, None when it is not installed."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return (r.stdout + r.stderr).strip()[:6000]
    except (OSError, subprocess.SubprocessError) as e:
        return f"{argv[0]} failed: {short(e)}"


SMI_QUERY = "name,driver_version,compute_cap,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.draw,power.limit"
SMI_QUERY += ",temperature.gpu,utilization.gpu,memory.used,memory.total,pstate"


def smi_snapshot() -> dict:
    """nvidia-smi's clocks and state (read only; the card's settings are never changed)."""
    if shutil.which("nvidia-smi") is None:
        return {"available": False, "reason": "nvidia-smi not found"}
    return {
        "available": True,
        "query": cmd(["nvidia-smi", f"--query-gpu={SMI_QUERY}", "--format=csv"]),
        "throttle": cmd(["nvidia-smi", "--query-gpu=clocks_event_reasons.active", "--format=csv"]),
    }


def ensure_importable() -> str:
    """Make `import fastenc` and `fastenc.kernels` work from this checkout and say how. The device copy of the tree
    is not pip-installed (no network there for `pip install -e .`), and kernels/ becomes fastenc.kernels only through
    the install's package-dir mapping, so without an install kernels/ is registered under that name here."""
    import importlib
    import importlib.util

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if "fastenc.kernels" in sys.modules:
        return "fastenc.kernels already imported"
    if importlib.util.find_spec("fastenc.kernels") is not None:
        return "installed (fastenc.kernels found by the import system)"
    import fastenc

    spec = importlib.util.spec_from_file_location(
        "fastenc.kernels", REPO / "kernels" / "__init__.py", submodule_search_locations=[str(REPO / "kernels")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastenc.kernels"] = module
    spec.loader.exec_module(module)
    fastenc.kernels = module
    return f"source checkout {REPO} (kernels/ registered as fastenc.kernels)"


def load_prebuilt(s=None) -> str | None:
    """Load the carried CUDA ops library when $FASTENC_SESSION_PREBUILT names one whose meta matches this torch and
    csrc/; fastenc.core.cuda then finds torch.ops.fastenc_cuda registered and builds nothing. Returns why not, or
    None (s: the calling Session or None, unused)."""
    path = os.environ.get(ENV_PREBUILT)
    if not path:
        return "no prebuilt library given"
    lib = Path(path)
    import torch

    if getattr(torch.ops, "fastenc_cuda", None) is not None and hasattr(torch.ops.fastenc_cuda, "layer_norm"):
        return None
    meta_path = lib.parent / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"no readable {meta_path} ({short(e)})"
    from fastenc.core import cuda as _cuda

    if meta.get("torch") != torch.__version__ or meta.get("source_hash") != _cuda.source_hash():
        return (
            f"prebuilt for torch {meta.get('torch')} / csrc {meta.get('source_hash')}, here torch "
            f"{torch.__version__} / csrc {_cuda.source_hash()}"
        )
    try:
        torch.ops.load_library(str(lib))
    except Exception as e:  # noqa: BLE001
        return f"torch.ops.load_library({lib}) failed: {short(e)}"
    return None


# ---------------------------------------------------------------------------------------------------- Markdown


def fmt(x, spec=".3f", none="-") -> str:
    return none if x is None else format(x, spec)


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def section(title: str, rows: list[dict], columns: tuple) -> list[str]:
    """'## title', then a table of `rows`, one column per (header, row -> cell text) pair; [] without rows."""
    if not rows:
        return []
    return (
        [f"## {title}", ""] + md_table([h for h, _ in columns], [[get(r) for _, get in columns] for r in rows]) + [""]
    )

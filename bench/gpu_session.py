"""One prepared GPU session: everything a session lent a GPU should measure, in one device call of <= 9 minutes.

    python bench/gpu_session.py --plan                      # the phases, their steps and estimated durations
    python bench/gpu_session.py --dry-run --out /tmp/gs     # every phase on the CPU at tiny sizes (CI runs this)
    python bench/gpu_session.py --commit SHA                # on the GPU machine: rows to $OUT (or --out DIR)
    python bench/gpu_session.py --phases towers,losses --deadline 200    # a rerun of some phases
    python bench/gpu_session.py --prebuild .cuda-prebuilt   # CPU machine, torch 2.11+cu130: build the CUDA ops

Phases, in priority order (PHASES below; adding one is one entry there plus its function):
  env        GPU, driver, clocks, versions, GEMM peak; the CUDA extension: a carried prebuilt library
             (--prebuild, loaded with torch.ops.load_library) or fastenc's JIT build with MAX_JOBS=16, timed
  tests      pytest -m gpu, then the Triton-on-CUDA test files (fp16/bf16/fp32 as the tests parametrize them);
             no -x, a per-test timeout where pytest-timeout is installed; one row per test as it finishes
  attention  fastenc.ops.attention against SDPA's flash / memory-efficient / cuDNN backends and a torch.compile'd
             eager attention at encoder shapes: TFLOP/s, raw samples, speedups, error against fp32
  towers     CLIP ViT-L/14 text / vision, T5-XXL encoder (2/24 layers) bf16, fp16 in a NaN check, SigLIP
             So400M vision, through fastenc.benchmark's runner: p50 latency, throughput, MFU vs the in-run GEMM peak
             (torch.compile reduce-overhead is out of the one-call plan: bench/bench_graphs.py measures it)
  losses     fastenc CLIP loss fp16 and SigLIP loss bf16 at N=65536, d=1024, forward + backward: time and peak memory,
             against the materialised (open_clip-style) loss at the largest N that fits
  embed      bench/bench_embed.py at ViT-L/14 b256 fp16 on synthetic JPEGs: model-only vs the fastenc embed
             pipeline (busy share) vs a transformers + DataLoader loop, samples/s
  training   bench/bench_training.py: one optimizer step of CLIP ViT-B/16 (both towers + contrastive loss, b128 bf16)
             and a T5-XL 2-block encoder stack, fastenc vs transformers SDPA + open_clip's materialised loss:
             samples/s or tokens/s, peak memory, speedup and memory ratio

How it keeps a lease from being wasted: the parent process never touches CUDA. Each phase runs in its own child
process with its own budget and the overall deadline (a crashed kernel or a poisoned CUDA context costs one phase
at most: the child is restarted on the steps it had not reached). A phase is skipped ("skipped: deadline") when
the time left is below its estimate, a step likewise. Every row is appended to <out>/gpu_session.jsonl (flushed and
fsynced) the moment it exists, so a timeout still returns everything measured so far; the Markdown summary
<out>/gpu_session.md is rewritten after every phase. Files under <out>: gpu_session.jsonl, gpu_session.md,
pytest.log, session.log (the children's output, tail-trimmed) - four files, well under the device tool's eight.

Timing reuses fastenc.benchmark (Timer: CUDA events after warm-up, 256 MiB L2 flush before each sample, raw
samples kept; matmul_peak; MemoryMeter; the runner for whole towers) and the flops() of bench_attention.py /
bench_contrastive.py. Models are built from configs with random weights (fastenc.benchmark.matrix), never
downloaded. Method and the device-tool call: bench/README.md, "GPU session".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
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
ENV_ROWS = "FASTENC_SESSION_ROWS"  # the JSONL file, for the pytest plugin in this module
ENV_STEP = "FASTENC_SESSION_STEP"
ENV_PREBUILT = "FASTENC_SESSION_PREBUILT"  # the carried library, when one is used
ENV_META = "FASTENC_SESSION_META"  # JSON: session id, commit, dry_run (stamped on the plugin's rows)
ENV_FAULT = "FASTENC_SESSION_FAULT"  # test hook: "phase/step:crash" or "phase/step:hang", comma-separated


# ---------------------------------------------------------------------------------------------------- the plan


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
    name: str
    title: str
    budget_s: float  # the child is killed after this (or at the overall deadline, whichever is first)
    steps: tuple[Step, ...]
    run: str  # the name of the function in this module that runs the phase in the child

    def est(self, dry: bool) -> float:
        start = DRY_CHILD_START_S if dry else CHILD_START_S
        return start + sum(s.dry_est_s if dry else s.est_s for s in self.steps if s.dry or not dry)


ENV_STEPS = (
    Step("versions", 4, 2),
    Step("cuda-extension", 70, 1),  # JIT build of csrc/ for sm_90a on 16 cores (guess); a prebuilt load is ~1 s
    Step("gemm-peak", 3, 1),
)

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
TEST_STEPS = (
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


def _attn(name, s, d, h, *, causal=False, pad=False, relbias=False, model="", est=6.0, dry=False):
    spec = dict(S=s, D=d, H=h, causal=causal, padding=pad, relbias=relbias, model=model, batches=(1, 64))
    return Step(name, est, 2.0, spec, dry)


# the model shapes (each a new autotune key: compile time dominates); odd head dims 72 / 80 / 128 among them. The rest
# of the seq x head-dim grid runs with bench/bench_attention.py in a second call when a lease has the time.
ATTENTION_STEPS = (
    _attn("s77-d64-causal-pad", 77, 64, 12, causal=True, pad=True, model="CLIP ViT-L/14 text", est=8, dry=True),
    _attn("s257-d64", 257, 64, 16, model="CLIP ViT-L/14 vision", dry=True),
    _attn("s577-d64", 577, 64, 16, model="CLIP ViT-L/14@336 vision"),
    _attn("s729-d72", 729, 72, 16, model="SigLIP So400M/14@384 vision"),
    _attn("s257-d80", 257, 80, 16, model="ViT-H/14 vision"),
    _attn("s512-d64-t5-relbias", 512, 64, 64, relbias=True, model="T5-XXL encoder (relative bias)", est=8, dry=True),
    _attn("s257-d128", 257, 128, 8, model="head dim 128"),
)
DRY_ATTENTION = {"H": 2, "S": {77: 17, 257: 33, 512: 40}, "D": 16}  # the dry run's tiny shapes (B 2 if padded)
ATTENTION_DTYPE = "fp16"

_TEXT = ["eager", "sdpa", "fastenc-triton", "fastenc-cuda", "fastenc-triton+graphs", "fastenc-cuda+graphs"]
TOWER_STEPS = (
    Step(
        "clip-l-text",
        50,
        8,
        dict(
            models=["clip-vit-l-14-text"],
            dtypes=["fp16"],
            batches=[1, 32],
            competitors=_TEXT,
            dry=dict(models=["tiny-clip-text"], competitors=_TEXT),
        ),
    ),
    Step(
        "clip-l-vision",
        35,
        4,
        dict(
            models=["clip-vit-l-14-vision"],
            dtypes=["fp16"],
            batches=[1, 32, 256],
            competitors=_TEXT,
            dry=dict(models=["tiny-clip-vision"], competitors=["sdpa", "fastenc-triton", "fastenc-cuda+graphs"]),
        ),
    ),
    Step(
        "t5-xxl",
        18,
        4,
        dict(
            models=["t5-v1_1-xxl"],
            dtypes=["bf16"],  # fp16 T5-XXL: the nan-check step below runs it
            batches=[8],
            seqs=[256],
            competitors=["eager", "sdpa", "fastenc-triton", "fastenc-cuda", "fastenc-triton+graphs"],
            dry=dict(models=["tiny-t5"], seqs=[16], competitors=["sdpa", "fastenc-triton"]),
        ),
    ),
    Step(
        "t5-xxl-nan-check",
        12,
        3,
        dict(
            model="t5-v1_1-xxl",
            dtypes=["fp16", "bf16"],
            batch=8,
            seq=256,
            competitors=["eager", "sdpa", "fastenc-triton", "fastenc-cuda"],
            dry=dict(model="tiny-t5", seq=16, competitors=["eager", "sdpa", "fastenc-triton"]),
        ),
    ),
    Step(
        "siglip-so400m-vision",
        22,
        4,
        dict(
            models=["siglip-so400m-14-384-vision"],
            dtypes=["bf16"],
            batches=[32],
            competitors=["sdpa", "fastenc-triton", "fastenc-cuda", "fastenc-triton+graphs"],
            dry=dict(models=["tiny-siglip-vision"], competitors=["sdpa", "fastenc-triton"]),
        ),
    ),
)
TOWER_SETTINGS = dict(iters=30, warmup=5, throughput_iters=10, row_budget_s=8.0, peak_n=None)
DRY_TOWER_SETTINGS = dict(iters=1, warmup=0, throughput_iters=0, row_budget_s=5.0, peak_n=128, batches=[1])

LOSS_N, LOSS_D = 65536, 1024
DRY_LOSS_N, DRY_LOSS_D = 32, 16
LOSS_STEPS = (  # one dtype per loss (the kernels are the same code for fp16 / bf16)
    Step("clip-fp16", 9, 3.0, dict(loss="clip", dtype="fp16"), dry=True),
    Step("siglip-bf16", 9, 3.0, dict(loss="siglip", dtype="bf16"), dry=True),
)

# fastenc embed (bench/bench_embed.py): ViT-L/14 b256 fp16 on synthetic 320x240 JPEGs, model-only vs the whole
# pipeline vs transformers + DataLoader; the estimate counts building + saving ViT-L (random weights) and 2048 JPEGs
# (8 batches of 256 per pass)
EMBED_STEPS = (
    Step("vit-l14-b256-fp16", 40, 4, dict(shape="ViT-L/14", images=2048, batch=256, dtype="fp16", iters=10)),
)
DRY_EMBED = dict(shape="tiny", images=48, batch=16, dtype="fp32", iters=1)

# bench/bench_training.py: one optimizer step (forward + backward + AdamW), fastenc vs transformers SDPA; the first
# step compiles / autotunes the backward kernels (untimed); then warm-up + timed steps
TRAINING_STEPS = (
    Step("clip-b16-b128-bf16", 38, 2, dict(case="clip", batch=128, dtype="bf16")),
    Step("t5-xl-2l-b8-s256-bf16", 14, 2, dict(case="t5", layers=2, batch=8, seq=256, dtype="bf16")),
)
DRY_TRAINING = dict(batch=8, layers=2, t5_batch=2, seq=16, dtype="fp32")

PHASES: tuple[Phase, ...] = (
    Phase(
        "env",
        "environment, clocks, GEMM peak; the CUDA extension (prebuilt, else JIT, MAX_JOBS=16)",
        150,
        ENV_STEPS,
        "phase_env",
    ),
    Phase(
        "tests",
        "GPU correctness: pytest -m gpu, then the Triton-on-CUDA files (no -x, per-test timeout)",
        120,
        TEST_STEPS,
        "phase_tests",
    ),
    Phase(
        "attention",
        "attention op vs SDPA flash / efficient / cuDNN and torch.compile, encoder shapes",
        100,
        ATTENTION_STEPS,
        "phase_attention",
    ),
    Phase(
        "towers",
        "CLIP ViT-L/14 text+vision, T5-XXL (2/24) + NaN check, SigLIP So400M: p50, throughput, MFU",
        240,
        TOWER_STEPS,
        "phase_towers",
    ),
    Phase(
        "losses",
        f"CLIP / SigLIP loss N={LOSS_N} d={LOSS_D} fp16/bf16 fwd+bwd vs materialised",
        60,
        LOSS_STEPS,
        "phase_losses",
    ),
    Phase(
        "embed",
        "fastenc embed pipeline: ViT-L/14 b256 fp16 model-only vs pipeline vs transformers + DataLoader",
        90,
        EMBED_STEPS,
        "phase_embed",
    ),
    Phase(
        "training",
        "one training step: CLIP ViT-B/16 b128 + loss, T5-XL 2 blocks; fastenc vs transformers SDPA + open_clip loss",
        90,
        TRAINING_STEPS,
        "phase_training",
    ),
)
PHASES_BY_NAME = {p.name: p for p in PHASES}


def plan_text(phases=PHASES, deadline_s: float = DEFAULT_DEADLINE_S) -> str:
    lines = [
        f"{'phase':<10} {'est s':>6} {'budget s':>8} {'dry est s':>9}  what",
    ]
    for p in phases:
        lines.append(f"{p.name:<10} {p.est(False):6.0f} {p.budget_s:8.0f} {p.est(True):9.0f}  {p.title}")
        for s in p.steps:
            lines.append(f"  - {s.name:<28} {s.est_s:5.1f} s (dry {s.dry_est_s:.1f} s)")
    total = sum(p.est(False) for p in phases)
    dry = sum(p.est(True) for p in phases)
    lines.append(
        f"total estimate {total:.0f} s on the GPU (dry run {dry:.0f} s); overall deadline {deadline_s:.0f} s; "
        f"device call limit planned for {DEVICE_CALL_S} s"
    )
    lines.append(
        "estimates are guesses until a GPU session has run this; each phase row records its wall_s to replace them"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- rows


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


def _short(e: BaseException, limit: int = 600) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------- child side


class Session:
    """What a phase function gets in the child: the row writer, the dry-run flag, the phase's deadline."""

    def __init__(self, args, phase: Phase):
        self.args, self.phase = args, phase
        self.out = Path(args.out)
        self.rows_path = self.out / ROWS_FILE
        self.dry = args.dry_run
        self.until = args.until
        self.session_id = args.session
        self.commit = args.commit
        self.skip_steps = set(filter(None, (args.skip_steps or "").split(",")))
        self.step: str | None = None
        self.device = None  # torch.device, set by setup_torch
        self.timer = None

    def remaining(self) -> float:
        return self.until - time.time()

    def row(self, kind: str, **fields) -> dict:
        row = {
            "session": self.session_id,
            "phase": self.phase.name,
            "step": self.step,
            "kind": kind,
            "time": utc_now(),
            "commit": self.commit,
            "dry_run": self.dry,
            **fields,
        }
        append_row(self.rows_path, row)
        return row

    # -- torch setup shared by the phases that run on the device
    def setup_torch(self, *, load_cuda_ops: bool = True):
        """torch, with the device chosen; on CUDA the carried prebuilt ops are loaded and (load_cuda_ops) fastenc's
        CUDA backend is loaded now, from the prebuilt ops or the env phase's cached JIT build, so that
        fastenc.available_backends() lists "cuda" in this process (it lists only what is loaded)."""
        import torch

        self.device = torch.device("cpu" if self.dry or not torch.cuda.is_available() else "cuda")
        if self.dry:
            torch.set_num_threads(1)  # steadier on a shared CI host (as fastenc bench --quick)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows stay IEEE fp32 (DESIGN.md); recorded in rows
            load_prebuilt(self)
            if load_cuda_ops:
                from fastenc.core import cuda as _cuda

                t0 = time.perf_counter()
                reason = _cuda.unavailable_reason()
                self.row(
                    "cuda_ops",
                    status="ok" if reason is None else "skipped",
                    reason=reason,
                    load_s=time.perf_counter() - t0,
                )
        return torch

    def cuda_alive(self) -> bool:
        """False when the CUDA context is poisoned (an illegal access or a device-side assert): every later CUDA
        call would fail, so the child exits and the parent restarts the phase on the steps not reached."""
        if self.device is None or self.device.type != "cuda":
            return True
        import torch

        try:
            torch.cuda.synchronize()
            (torch.ones(4, device=self.device) * 2).sum().item()
            return True
        except Exception:  # noqa: BLE001
            return False

    def run_steps(self, fn) -> None:
        """fn(session, step) for every step of the phase not skipped; per-step try/except, budget checks and
        step start / end rows (what the parent reads to restart a crashed phase where it stopped)."""
        for step in self.phase.steps:
            self.step = step.name
            if step.name in self.skip_steps:
                continue
            if self.dry and not step.dry:
                self.row(
                    "step",
                    status="skipped",
                    reason="skipped: not part of the dry run (same code path as a dry-run step at another size)",
                )
                continue
            est = step.dry_est_s if self.dry else step.est_s
            left = self.remaining()
            if left < est:
                self.row("step", status="skipped", reason=f"skipped: deadline ({left:.0f} s left < estimate {est:g} s)")
                continue
            self.row("step", status="start", est_s=est)
            _inject_fault(self.phase.name, step.name)
            t0 = time.perf_counter()
            status, reason = "ok", None
            try:
                fn(self, step)
            except (Exception, SystemExit) as e:  # noqa: BLE001 - one failure is a row, the phase goes on
                status, reason = "error", _short(e)
                self.row("error", status="error", reason=reason, traceback=traceback.format_exc()[-3000:])
            self.row("step", status="done", result=status, reason=reason, wall_s=time.perf_counter() - t0)
            if status == "error" and not self.cuda_alive():
                self.row("error", status="error", reason="CUDA context lost after this step; the child exits")
                sys.stdout.flush()
                os._exit(3)
        self.step = None


def _inject_fault(phase: str, step: str) -> None:
    """tests/test_gpu_session.py's way to check the parent's handling of a child that dies or hangs in a step."""
    for fault in filter(None, os.environ.get(ENV_FAULT, "").split(",")):
        where, _, what = fault.rpartition(":")
        if where == f"{phase}/{step}":
            if what == "crash":
                os._exit(7)
            if what == "hang":
                time.sleep(3600)


def load_prebuilt(s: Session | None) -> str | None:
    """Load the carried CUDA ops library when $FASTENC_SESSION_PREBUILT names one whose meta matches this torch and
    csrc/; fastenc.core.cuda then finds torch.ops.fastenc_cuda registered and builds nothing. Returns why not, or
    None."""
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
        return f"no readable {meta_path} ({_short(e)})"
    from fastenc.core import cuda as _cuda

    if meta.get("torch") != torch.__version__ or meta.get("source_hash") != _cuda.source_hash():
        return (
            f"prebuilt for torch {meta.get('torch')} / csrc {meta.get('source_hash')}, here torch "
            f"{torch.__version__} / csrc {_cuda.source_hash()}"
        )
    try:
        torch.ops.load_library(str(lib))
    except Exception as e:  # noqa: BLE001
        return f"torch.ops.load_library({lib}) failed: {_short(e)}"
    return None


def _on_sigterm(signum, frame):  # the parent's timeout: end the pytest (or build) this child started, then exit
    for proc in list(_CHILD_PROCS):
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
    os._exit(124)


_CHILD_PROCS: list = []


# ---------------------------------------------------------------------------------------------------- phase: env


def _cmd(argv: list[str], timeout: float = 20) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return (r.stdout + r.stderr).strip()[:6000]
    except (OSError, subprocess.SubprocessError) as e:
        return f"{argv[0]} failed: {_short(e)}"


SMI_QUERY = "name,driver_version,compute_cap,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.draw,power.limit"
SMI_QUERY += ",temperature.gpu,utilization.gpu,memory.used,memory.total,pstate"


def smi_snapshot() -> dict:
    """nvidia-smi's clocks and state (read only; the card's settings are never changed)."""
    if shutil.which("nvidia-smi") is None:
        return {"available": False, "reason": "nvidia-smi not found"}
    return {
        "available": True,
        "query": _cmd(["nvidia-smi", f"--query-gpu={SMI_QUERY}", "--format=csv"]),
        "throttle": _cmd(["nvidia-smi", "--query-gpu=clocks_event_reasons.active", "--format=csv"]),
    }


def phase_env(s: Session) -> None:
    torch = s.setup_torch(load_cuda_ops=False)  # the cuda-extension step loads (or builds) them, timed

    def versions(s, step):
        from fastenc.benchmark.env import device_info, versions

        info = {
            "device_info": device_info(s.device),
            "versions": versions(),
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "python_executable": sys.executable,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "nvcc": _cmd(["nvcc", "--version"]),
            "smi": smi_snapshot(),
            "smi_clocks": _cmd(["nvidia-smi", "-q", "-d", "CLOCK"]) if shutil.which("nvidia-smi") else None,
            "smi_performance": _cmd(["nvidia-smi", "-q", "-d", "PERFORMANCE"]) if shutil.which("nvidia-smi") else None,
            "env": {
                k: os.environ.get(k)
                for k in (
                    "MAX_JOBS",
                    "TORCH_CUDA_ARCH_LIST",
                    "TRITON_INTERPRET",
                    "FASTENC_CUDA_CACHE",
                    ENV_PREBUILT,
                    "CUDA_HOME",
                )
            },
        }
        if s.device.type == "cuda":
            p = torch.cuda.get_device_properties(s.device)
            info["sm_count"] = p.multi_processor_count
            info["l2_mb"] = getattr(p, "L2_cache_size", 0) / 2**20
        s.row("env", status="ok", device=info["device_info"]["name"], **info)

    def cuda_extension(s, step):
        from fastenc.core import cuda as _cuda

        prebuilt = os.environ.get(ENV_PREBUILT)
        why_not_prebuilt = load_prebuilt(s) if s.device.type == "cuda" else "no CUDA device"
        t0 = time.perf_counter()
        reason = _cuda.unavailable_reason()  # loads the prebuilt ops, or JIT-builds csrc/ (cached for later phases)
        build_s = time.perf_counter() - t0
        fields = dict(
            prebuilt=prebuilt,
            prebuilt_used=prebuilt is not None and why_not_prebuilt is None and reason is None,
            prebuilt_reason=why_not_prebuilt,
            load_s=build_s,
            max_jobs=os.environ.get("MAX_JOBS"),
            arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST"),
            cache_dir=str(_cuda.cache_dir()),
        )
        if reason is None:
            s.row("cuda_ext", status="ok", how=_cuda.extension(), build_s=build_s, **fields)
            return
        log = _cuda.cache_dir() / "build_error.log"
        tail = log.read_text(errors="replace")[-4000:] if log.exists() else None
        status = "skipped" if s.device.type != "cuda" else "error"
        s.row("cuda_ext", status=status, reason=reason, build_log_tail=tail, **fields)

    def gemm_peak(s, step):
        from fastenc.benchmark.timing import matmul_peak

        for dt in ("bf16", "fp16"):
            s.row("gemm_peak", status="ok", **matmul_peak(s.device, dt, 128 if s.dry else None))

    s.run_steps(
        lambda s, step: {"versions": versions, "cuda-extension": cuda_extension, "gemm-peak": gemm_peak}[step.name](
            s, step
        )
    )


# ---------------------------------------------------------------------------------------------------- phase: tests


def phase_tests(s: Session) -> None:
    import importlib.util

    log = s.out / PYTEST_LOG
    has_timeout = importlib.util.find_spec("pytest_timeout") is not None

    def run(s, step):
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
            "gpu_session",
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
            _CHILD_PROCS.append(proc)
            s.row("pytest", status="running", pgid=proc.pid)  # the parent ends this group if the child dies first
            try:
                rc, status = proc.wait(timeout=max(1.0, left)), "ok"
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                rc, status = proc.wait(), "timeout"
            _CHILD_PROCS.remove(proc)
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

    s.run_steps(run)


# pytest plugin (active in the pytest that phase_tests starts, through `-p gpu_session`): one row per test result


def pytest_configure(config):
    ensure_importable()
    if os.environ.get(ENV_PREBUILT):
        with contextlib.suppress(Exception):
            load_prebuilt(None)


def pytest_collectreport(report):
    if report.failed:  # a test file that does not import: one row, its tests never run
        pytest_runtest_logreport(report)


def pytest_runtest_logreport(report):
    path = os.environ.get(ENV_ROWS)
    if not path:
        return
    if getattr(report, "when", "collect") != "call" and report.outcome == "passed":
        return  # setup / teardown that passed: the call's row says it
    meta = json.loads(os.environ.get(ENV_META, "{}"))
    message = None
    if report.outcome != "passed":
        if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])
        else:
            text = str(report.longrepr or "")
            message = text.strip().splitlines()[-1][:400] if text.strip() else None
    append_row(
        Path(path),
        {
            "session": meta.get("session"),
            "phase": "tests",
            "step": os.environ.get(ENV_STEP),
            "kind": "test",
            "time": utc_now(),
            "commit": meta.get("commit"),
            "dry_run": meta.get("dry_run"),
            "nodeid": report.nodeid,
            "when": getattr(report, "when", "collect"),
            "outcome": report.outcome
            if getattr(report, "when", None) == "call" or report.outcome == "skipped"
            else "error",
            "duration_s": round(getattr(report, "duration", 0.0), 4),
            "message": message,
        },
    )


# ---------------------------------------------------------------------------------------------------- phase: attention

SDPA_BACKENDS = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
}
ATTENTION_COMPETITORS = ("fastenc-triton", "fastenc-cuda", *SDPA_BACKENDS, "compile")


def _eager_attention(q, k, v, mask, scale):
    """What users write and torch.compile fuses: matmuls in the input dtype, softmax in fp32."""
    import torch

    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    return torch.matmul(p, v)


def phase_attention(s: Session) -> None:
    torch = s.setup_torch()
    import bench_attention as ba

    import fastenc
    from fastenc.benchmark.timing import Timer, summarize
    from fastenc.core.errors import BackendUnavailableError
    from fastenc.ops.attention import attention_reference, relative_bias_reference, relative_position_buckets

    dev, dry = s.device, s.dry
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[ATTENTION_DTYPE]
    if dry:
        dtype = torch.float32  # the interpreter and the CPU run fp32 (fp16 matmuls are slow or missing there)
    timer = Timer(dev, flush_l2=not dry)
    iters, warmup = (1, 0) if dry else (40, 3)
    for knob in ("recompile_limit", "cache_size_limit"):  # every shape compiles once, none falls back to eager
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
    compiled = torch.compile(_eager_attention, backend="eager") if dry else torch.compile(_eager_attention)
    compile_label = "torch.compile(backend=eager) [dry-run stand-in]" if dry else "torch.compile (inductor)"

    def case(s, step):
        sp = step.spec
        seq, d, h = sp["S"], sp["D"], sp["H"]
        batches = sp["batches"]
        if dry:
            seq, d, h = DRY_ATTENTION["S"].get(seq, 24), DRY_ATTENTION["D"], DRY_ATTENTION["H"]
            batches = (2,) if sp["padding"] else (1,)
        for b in batches:
            _attention_case(s, sp, b, h, seq, d)

    def _attention_case(s, sp, b, h, seq, d):
        torch.manual_seed(0)
        causal, pad, relbias = sp["causal"], sp["padding"], sp["relbias"]
        q, k, v, kpm, _ = ba.make_inputs(b, h, seq, d, dtype, mask=pad, bias=False, device=dev)
        scale = d**-0.5
        table = lut = dense_bias = None
        if relbias:
            table = torch.randn(32, h, device=dev, dtype=dtype)
            lut = relative_position_buckets(seq, seq, device=dev)
            dense_bias = relative_bias_reference(table, lut, seq, seq).to(dtype)
        mask, sdpa_causal = ba.sdpa_mask(q, kpm, dense_bias, causal)
        eager_mask = mask if mask is not None else (_causal_mask(q) if sdpa_causal else None)
        ref = attention_reference(q.float(), k.float(), v.float(), kpm, None, table, lut, causal=causal, scale=scale)
        # PyTorch's own error in this dtype (the 2x rule's baseline): the eager composite in the input dtype
        torch_err = (_eager_attention(q, k, v, eager_mask, scale).float() - ref).abs().max().item()
        config = dict(
            B=b, H=h, S=seq, D=d, causal=causal, padding=pad, relbias=relbias, dtype=str(dtype)[6:], model=sp["model"]
        )
        flops = ba.flops(b, h, seq, seq, d, causal)

        def fast(backend):
            return lambda: fastenc.ops.attention(
                q,
                k,
                v,
                causal=causal,
                key_padding_mask=kpm,
                scale=scale,
                rel_bias_table=table,
                rel_bias_lut=lut,
                backend=backend,
                strict=True,
            )

        fns = {
            "fastenc-triton": (fast("triton"), None, "fastenc.ops.attention backend=triton"),
            "fastenc-cuda": (fast("cuda"), None, "fastenc.ops.attention backend=cuda"),
            "compile": (lambda: compiled(q, k, v, eager_mask, scale), None, compile_label),
        }
        for name, backend in SDPA_BACKENDS.items():
            fns[name] = (
                lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=sdpa_causal, scale=scale
                ),
                backend,
                f"torch SDPA, {backend} only",
            )
        results: dict[str, dict] = {}
        for name in ATTENTION_COMPETITORS:
            fn, backend, provider = fns[name]
            row = dict(config=config, competitor=name, provider=provider, flops=flops, torch_err=torch_err)
            if dev.type != "cuda" and (backend or name == "fastenc-cuda"):
                results[name] = dict(
                    row,
                    status="skipped",
                    reason="needs a CUDA device (SDPA's fused backends and fastenc's CUDA kernels are CUDA-only)",
                )
                continue
            ctx = _sdpa_ctx(backend)
            caught: list = []
            try:
                with warnings.catch_warnings(record=True) as caught, ctx():
                    warnings.simplefilter("always")  # SDPA says in warnings why a backend refuses the inputs
                    t0 = time.perf_counter()
                    out = fn()
                    timer.sync()
                    first = time.perf_counter() - t0
                err = (out.float() - ref).abs().nan_to_num(float("inf")).max().item()
                row.update(
                    status="ok", first_call_s=first, max_abs_err=err, nonfinite=int((~torch.isfinite(out)).sum().item())
                )
                del out
                with ctx():
                    for _ in range(warmup):
                        fn()
                if name == "fastenc-triton" and not dry:
                    row["autotuned"] = ba.chosen_config()  # the autotuner's pick for these inputs
                row["_fn"], row["_ctx"] = fn, ctx
            except Exception as e:  # noqa: BLE001 - a refusal is a skip with SDPA's reasons, anything else an error
                notes = "; ".join(sorted({str(w.message)[:200] for w in caught or []}))
                unsupported = isinstance(e, BackendUnavailableError) or "No available kernel" in str(e)
                row.update(
                    status="skipped" if unsupported else "error", reason=_short(e) + (f" [{notes}]" if notes else "")
                )
            results[name] = row
        # samples interleaved across competitors: round i takes one sample of each, so drift hits all alike
        live = {n: r for n, r in results.items() if r["status"] == "ok"}
        samples: dict[str, list[float]] = {n: [] for n in live}
        for _ in range(iters):
            for n, r in live.items():
                with r["_ctx"]():
                    samples[n].append(timer.once(r["_fn"]))
        for n, r in live.items():
            del r["_fn"], r["_ctx"]
            st = summarize(samples[n])
            r.update(
                st, samples_ms=samples[n], iters=iters, timer=timer.name, tflops=flops / (st["p50_ms"] * 1e-3) / 1e12
            )
        for n, r in live.items():
            r["speedup_vs"] = {o: live[o]["p50_ms"] / r["p50_ms"] for o in live if o != n}
        for r in results.values():
            s.row("attention", **r)

    s.run_steps(case)


def _causal_mask(q):
    import torch

    n = q.shape[2]
    tri = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return torch.zeros(n, n, dtype=q.dtype, device=q.device).masked_fill(~tri, float("-inf"))


def _sdpa_ctx(backend: str | None):
    if backend is None:
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return lambda: sdpa_kernel([getattr(SDPBackend, backend)])


# ---------------------------------------------------------------------------------------------------- phase: towers


def add_compile_reduce_overhead(dry: bool) -> None:
    """fastenc.benchmark's competitors have torch.compile default and max-autotune; the session also times
    mode="reduce-overhead" (inductor + its CUDA graphs), registered here. In a dry run (CPU) it is torch.compile
    with backend="eager": the wiring is exercised, inductor's CPU compile time is not paid."""
    from fastenc.benchmark import competitors as comp
    from fastenc.benchmark import report

    name = "compile-reduce-overhead"
    if name in comp.COMPETITORS:
        return
    build = comp.build

    def build_with_reduce_overhead(competitor, spec, ctx):
        if competitor != name:
            return build(competitor, spec, ctx)
        if not dry:
            return comp._compile(competitor, spec, ctx, "reduce-overhead")
        import torch

        t0 = time.perf_counter()
        model = torch.compile(spec.build("sdpa", ctx.device, ctx.dtype), backend="eager", dynamic=False)
        label = "torch.compile(backend=eager) of transformers sdpa [dry-run stand-in for mode=reduce-overhead]"
        return comp._torch_runner(
            competitor, label, model, t0, new_case=torch._dynamo.reset, on_cpu=ctx.device.type == "cpu"
        )

    comp.build = build_with_reduce_overhead
    comp.COMPETITORS = (*comp.COMPETITORS, name)
    comp.BASELINES = (*comp.BASELINES, name)
    report.BASELINES = (*report.BASELINES, name)


def phase_towers(s: Session) -> None:
    torch = s.setup_torch()
    from fastenc.benchmark import runner

    add_compile_reduce_overhead(s.dry)
    runner.git_commit = lambda *a, **k: s.commit  # the device copy of the tree has no .git: the session's commit
    settings = DRY_TOWER_SETTINGS if s.dry else TOWER_SETTINGS

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
                    row.update(status="error", reason=_short(e))
                finally:
                    r = out = None  # noqa: F841 (free the model before the next is built)
                s.row("nan_check", **row)
                if s.device.type == "cuda":
                    torch.cuda.empty_cache()

    s.run_steps(bench)


# ---------------------------------------------------------------------------------------------------- phase: losses


def phase_losses(s: Session) -> None:
    torch = s.setup_torch()
    import bench_contrastive as bc

    from fastenc.benchmark.timing import MemoryMeter, Timer, summarize

    timer = Timer(s.device, flush_l2=False)
    meter = MemoryMeter(s.device)
    n_full, d = (DRY_LOSS_N, DRY_LOSS_D) if s.dry else (LOSS_N, LOSS_D)
    iters, warmup = (1, 0) if s.dry else (5, 1)
    smallest = DRY_LOSS_N // 4 if s.dry else 4096

    def measure(loss, provider, n, dtype, dname) -> dict:
        row = dict(loss=loss, provider=provider, config=dict(N=n, d=d, dtype=dname), flops=bc.flops(n, d))
        step = forward = ref = None
        try:
            torch.manual_seed(0)  # the same features for both providers at one N: their loss values must agree
            step, forward, ref = bc.make_step(provider, loss, n, d, dtype, device=s.device)
            meter.start()
            t0 = time.perf_counter()
            step()
            timer.sync()
            first = time.perf_counter() - t0
            for _ in range(warmup):
                step()
            samples = timer.samples(step, iters)
            mem = meter.stop()
            st = summarize(samples)
            value = forward().item()
            row.update(
                status="ok",
                first_call_s=first,
                samples_ms=samples,
                **st,
                **mem,
                loss_value=value,
                tflops=row["flops"] / (st["p50_ms"] * 1e-3) / 1e12,
            )
        except Exception as e:  # noqa: BLE001
            oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
            row.update(status="oom" if oom else "error", reason=_short(e, 300))
        finally:
            step = forward = ref = None  # noqa: F841
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
        return row

    def run(s, step):
        loss, dname = step.spec["loss"], step.spec["dtype"]
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dname]
        if s.dry:
            dtype, dname = torch.float32, "fp32"  # fp16 matmuls on the CPU are slow or missing; this proves the wiring
        s.row("loss", **measure(loss, "fastenc", n_full, dtype, dname))
        n, status = n_full, None
        while n >= smallest:  # the materialised loss at the largest N that fits
            status = s.row("loss", **measure(loss, "reference", n, dtype, dname))["status"]
            if status != "oom":
                break
            n //= 2
        if n != n_full and status == "ok":  # fastenc at the reference's N too, for a like-for-like ratio
            s.row("loss", **measure(loss, "fastenc", n, dtype, dname))

    s.run_steps(run)


def phase_embed(s: Session) -> None:
    """bench_embed.run in this child: rows "embed" (provider model-only / fastenc / hf-model-only / baseline)."""
    s.setup_torch(load_cuda_ops=False)
    import tempfile

    import bench_embed as be

    def run(s, step):
        spec = dict(DRY_EMBED if s.dry else step.spec)
        argv = ["--shape", spec["shape"], "--images", str(spec["images"]), "--batch", str(spec["batch"]),
                "--dtype", spec["dtype"], "--iters", str(spec["iters"]), "--device", str(s.device)]  # fmt: skip
        if s.dry:
            argv += ["--workers", "1"]
        with tempfile.TemporaryDirectory(prefix="gs-embed-") as work:
            be.run(be.parser().parse_args([*argv, "--work", work]), sink=lambda row: s.row("embed", status="ok", **row))

    s.run_steps(run)


def phase_training(s: Session) -> None:
    """bench_training.measure for both providers per step: rows "training" (samples/s or tokens/s, peak memory,
    the first step's loss and fastenc.trace() counts; the fastenc row carries the ratios to transformers)."""
    s.setup_torch(load_cuda_ops=False)
    import bench_training as bt

    iters, warmup = (1, 0) if s.dry else (5, 1)

    def run(s, step):
        spec, dry = step.spec, DRY_TRAINING
        rows = []
        for provider in bt.PROVIDERS:
            if spec["case"] == "clip":
                batch, dtype = (dry["batch"], dry["dtype"]) if s.dry else (spec["batch"], spec["dtype"])

                def build(p=provider, batch=batch, dtype=dtype):
                    return bt.clip_case(p, tiny=s.dry, batch=batch, dtype=dtype, device=s.device)
            else:
                shape = (dry["layers"], dry["t5_batch"], dry["seq"], dry["dtype"]) if s.dry else (
                    spec["layers"], spec["batch"], spec["seq"], spec["dtype"])  # fmt: skip

                def build(p=provider, shape=shape):
                    layers, batch, seq, dtype = shape
                    return bt.t5_case(p, tiny=s.dry, layers=layers, batch=batch, seq=seq, dtype=dtype, device=s.device)

            rows.append(bt.measure(spec["case"], provider, build, device=s.device, iters=iters, warmup=warmup))
        bt.add_ratios(rows)
        for r in rows:
            s.row("training", **r)

    s.run_steps(run)


# ---------------------------------------------------------------------------------------------------- parent side


def resolve_commit(given: str | None) -> tuple[str, str]:
    """(commit, where it came from): --commit, $FASTENC_COMMIT, a .session-commit file at the repo root (written
    before the call: the device copy of the tree has no .git), git, else "unknown"."""
    if given:
        return given, "--commit"
    if os.environ.get("FASTENC_COMMIT"):
        return os.environ["FASTENC_COMMIT"], "$FASTENC_COMMIT"
    f = REPO / ".session-commit"
    if f.exists() and f.read_text().strip():
        return f.read_text().strip(), ".session-commit"
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if r.returncode == 0 and r.stdout.strip():
            dirty = subprocess.run(
                ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=20
            ).stdout.strip()
            return r.stdout.strip() + ("-dirty" if dirty else ""), "git"
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown", "none: pass --commit SHA (the device copy has no .git)"


def _child_env(args, out: Path, session_id: str, commit: str) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env[ENV_ROWS] = str(out / ROWS_FILE)
    env[ENV_META] = json.dumps({"session": session_id, "commit": commit, "dry_run": args.dry_run})
    env.setdefault("MAX_JOBS", "16")
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"  # before any triton import in the child
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU path even on a GPU machine
        env["OMP_NUM_THREADS"] = "1"
        env.pop(ENV_PREBUILT, None)
        return env
    if "TORCH_CUDA_ARCH_LIST" not in env:  # sm_90a on Hopper (wgmma); the same in every child: one JIT build
        cap = _cmd(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"])
        if cap and cap.splitlines()[0].strip().replace(".", "").isdigit():
            c = cap.splitlines()[0].strip()
            env["TORCH_CUDA_ARCH_LIST"] = c + ("a" if c == "9.0" else "")
    lib = Path(args.prebuilt) if args.prebuilt else PREBUILT_DIR / f"{PREBUILT_NAME}.so"
    if lib.exists():
        env[ENV_PREBUILT] = str(lib.resolve())
    return env


def run_phase(
    args, phase: Phase, out: Path, env: dict, session_id: str, commit: str, deadline: float, log_rows
) -> dict:
    """Run one phase in child processes (restarted after a crash on the steps not reached); returns its row."""
    rows_path = out / ROWS_FILE
    t0 = time.time()
    phase_until = min(t0 + phase.budget_s, deadline - SUMMARY_RESERVE_S)
    skip: set[str] = set()
    attempts, status, rc, notes = 0, "ok", None, []
    while True:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            phase.name,
            "--out",
            str(out),
            "--until",
            repr(phase_until),
            "--session",
            session_id,
            "--commit",
            commit,
        ]
        if args.dry_run:
            cmd.append("--dry-run")
        if skip:
            cmd += ["--skip-steps", ",".join(sorted(skip))]
        with (out / SESSION_LOG).open("a") as logf:
            logf.write(f"\n===== {utc_now()} phase {phase.name} attempt {attempts + 1}: {' '.join(cmd[2:])}\n")
            logf.flush()
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=max(1.0, phase_until - time.time()))
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGTERM)  # the child kills its pytest, then exits
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(OSError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                rc = proc.returncode
            with contextlib.suppress(OSError):  # anything of the child's group still running (compile workers)
                os.killpg(proc.pid, signal.SIGKILL)
            _end_orphans(rows_path, session_id, phase.name)
        mine = [
            r
            for r in read_rows(rows_path)
            if r.get("session") == session_id and r.get("phase") == phase.name and r.get("kind") == "step"
        ]
        started = {r["step"] for r in mine if r.get("status") == "start"}
        finished = {r["step"] for r in mine if r.get("status") in ("done", "skipped")}
        cut = sorted(started - finished - skip)
        for name in cut:
            why = (
                f"killed at the phase's deadline ({phase.budget_s:g} s budget or the overall deadline)"
                if timed_out
                else f"the child exited with status {rc} during this step (crash or lost CUDA context)"
            )
            log_rows(
                {
                    "session": session_id,
                    "phase": phase.name,
                    "step": name,
                    "kind": "step",
                    "status": "done",
                    "result": "timeout" if timed_out else "error",
                    "reason": why,
                    "time": utc_now(),
                    "commit": commit,
                    "dry_run": args.dry_run,
                }
            )
        if timed_out:
            status = "timeout"
            notes.append(f"timed out; steps cut: {', '.join(cut) or 'none'}")
            break
        if rc == 0:
            status = "partial" if attempts else "ok"  # partial: restarted after a crash, the rest ran
            break
        status = "error"
        notes.append(f"child exited {rc}" + (f" in step {', '.join(cut)}" if cut else ""))
        progress = (started | finished) - skip
        left_steps = [st for st in phase.steps if st.name not in started | finished | skip]
        if not progress or not left_steps or attempts >= MAX_RESTARTS or time.time() > phase_until - CHILD_START_S:
            break  # no progress (e.g. an import error), nothing left, or no time: give up on this phase
        skip |= started | finished
        attempts += 1
    seen = {
        r["step"]
        for r in read_rows(rows_path)
        if r.get("session") == session_id and r.get("phase") == phase.name and r.get("kind") == "step"
    }
    for st in phase.steps:  # every step ends with a row, the ones the phase never reached included
        if st.name not in seen:
            log_rows(
                {
                    "session": session_id,
                    "phase": phase.name,
                    "step": st.name,
                    "kind": "step",
                    "status": "skipped",
                    "reason": f"skipped: not reached (the phase ended: {status})",
                    "time": utc_now(),
                    "commit": commit,
                    "dry_run": args.dry_run,
                }
            )
    return {"status": status, "rc": rc, "wall_s": time.time() - t0, "attempts": attempts + 1, "notes": notes}


def _end_orphans(rows_path: Path, session_id: str, phase: str) -> None:
    """Kill the pytest process groups a phase's child started, should the child have died without ending them
    (they run in their own session): by the ids the child recorded, and only if they still run pytest."""
    for r in read_rows(rows_path):
        if r.get("session") == session_id and r.get("phase") == phase and r.get("kind") == "pytest" and r.get("pgid"):
            pid = int(r["pgid"])
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"pytest" in cmdline:
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)


def parent_main(args) -> int:
    out = Path(args.out or os.environ.get("OUT") or REPO / "gpu-session-out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / ROWS_FILE
    start = time.time()
    deadline = start + args.deadline
    session_id = uuid.uuid4().hex[:12]
    commit, commit_source = resolve_commit(args.commit)
    names = [n.strip() for n in (args.phases or ",".join(PHASES_BY_NAME)).split(",") if n.strip()]
    unknown = sorted(set(names) - set(PHASES_BY_NAME))
    if unknown:
        raise SystemExit(f"gpu_session: unknown phases {unknown}; known: {', '.join(PHASES_BY_NAME)}")
    phases = [p for p in PHASES if p.name in names]  # always in priority order

    def log_row(row):
        append_row(rows_path, row, sync=True)

    base = {"session": session_id, "commit": commit, "dry_run": args.dry_run}
    log_row(
        {
            **base,
            "phase": "session",
            "step": None,
            "kind": "session",
            "status": "start",
            "time": utc_now(),
            "commit_source": commit_source,
            "argv": sys.argv[1:],
            "deadline_s": args.deadline,
            "plan": {p.name: {"est_s": p.est(args.dry_run), "budget_s": p.budget_s} for p in phases},
            "host": platform.node(),
            "python": platform.python_version(),
            "out": str(out),
        }
    )
    if commit == "unknown":
        print(f"gpu_session: commit unknown ({commit_source})", flush=True)
    env = _child_env(args, out, session_id, commit)
    print(
        f"gpu_session {session_id}: {len(phases)} phases, deadline {args.deadline:.0f} s, rows -> {rows_path}",
        flush=True,
    )
    for phase in phases:
        left = deadline - SUMMARY_RESERVE_S - time.time()
        est = phase.est(args.dry_run)
        if left < est:
            result = {
                "status": "skipped",
                "reason": f"skipped: deadline ({left:.0f} s left < estimate {est:.0f} s)",
                "wall_s": 0.0,
            }
        else:
            result = run_phase(args, phase, out, env, session_id, commit, deadline, log_row)
        log_row(
            {
                **base,
                "phase": phase.name,
                "step": None,
                "kind": "phase",
                "time": utc_now(),
                "est_s": est,
                "budget_s": phase.budget_s,
                **result,
            }
        )
        print(
            f"[{time.time() - start:6.1f} s] {phase.name:<10} {result['status']:<8} {result['wall_s']:6.1f} s"
            + (f"  {result.get('reason') or '; '.join(result.get('notes', []))}" if result["status"] != "ok" else ""),
            flush=True,
        )
        if phase.name == "env" and not args.dry_run and "FASTENC_CUDA_JIT" not in os.environ:
            ext = [r for r in read_rows(rows_path) if r.get("session") == session_id and r.get("kind") == "cuda_ext"]
            if not ext or ext[-1].get("status") != "ok":  # each later child would start the same failing build
                env["FASTENC_CUDA_JIT"] = "0"
                print(
                    "gpu_session: the CUDA ops did not load in the env phase; later phases run without them", flush=True
                )
        write_summary(out, session_id)
    log_row(
        {
            **base,
            "phase": "session",
            "step": None,
            "kind": "session",
            "status": "end",
            "time": utc_now(),
            "wall_s": time.time() - start,
            "smi_end": None if args.dry_run else smi_snapshot(),
        }
    )
    for name in (SESSION_LOG, PYTEST_LOG):
        _trim(out / name)
    shutil.rmtree(out / "_work", ignore_errors=True)
    text = write_summary(out, session_id)
    print(text[-9000:], flush=True)
    return 0


def _trim(path: Path) -> None:
    if path.exists() and path.stat().st_size > LOG_KEEP_BYTES:
        data = path.read_bytes()[-LOG_KEEP_BYTES:]
        path.write_bytes(b"[... trimmed ...]\n" + data)


# ---------------------------------------------------------------------------------------------------- summary


def _f(x, spec=".3f", none="-"):
    return none if x is None else format(x, spec)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def row_phase(r: dict) -> str | None:
    """The phase of a row: its own field, or for the runner's tower rows the one in their label."""
    if r.get("phase"):
        return r["phase"]
    label = r.get("label") or ""
    return label.split()[-1].split("/")[0] if label.startswith("gpu-session ") else None


def summary_text(rows: list[dict], session_id: str) -> str:
    rows = [
        r
        for r in rows
        if r.get("session") == session_id or (r.get("label") or "").startswith(f"gpu-session {session_id} ")
    ]
    start = next((r for r in rows if r.get("kind") == "session" and r.get("status") == "start"), {})
    end = next((r for r in rows if r.get("kind") == "session" and r.get("status") == "end"), None)
    env = next((r for r in rows if r.get("kind") == "env"), {})
    dry = start.get("dry_run")
    v = env.get("versions") or {}
    lines = [f"# GPU session {session_id}" + (" (dry run: CPU, tiny shapes; timings mean nothing)" if dry else ""), ""]
    lines.append(
        f"- device: {env.get('device', '?')}; commit {start.get('commit')} ({start.get('commit_source')}); "
        f"started {start.get('time')}" + (f"; wall {end['wall_s']:.0f} s" if end else "; not finished")
    )
    if v:
        lines.append(
            f"- torch {v.get('torch')} (CUDA {v.get('cuda')}), triton {v.get('triton')}, transformers "
            f"{v.get('transformers')}, python {v.get('python')}, cudnn {env.get('cudnn')}, fastenc "
            f"{v.get('fastenc')}, backends {v.get('fastenc_backends')}"
        )
    smi = (env.get("smi") or {}).get("query")
    if smi:
        lines.append("- nvidia-smi at start: " + smi.replace("\n", " / "))
    if end and (end.get("smi_end") or {}).get("query"):
        lines.append("- nvidia-smi at end: " + end["smi_end"]["query"].replace("\n", " / "))
    peaks = [r for r in rows if r.get("kind") == "gemm_peak" and r.get("status") == "ok"]
    if peaks:
        lines.append(
            "- GEMM peak (in-run): "
            + "; ".join(f"{p['dtype']} {p['tflops']:.1f} TFLOP/s ({'x'.join(map(str, p['shape']))})" for p in peaks)
        )
    ext = next((r for r in rows if r.get("kind") == "cuda_ext"), None)
    if ext:
        lines.append(
            f"- CUDA extension: {ext.get('status')}: "
            + (
                f"{ext.get('how')} in {ext.get('build_s', 0):.1f} s"
                if ext.get("status") == "ok"
                else str(ext.get("reason"))
            )
            + (
                f" (prebuilt not used: {ext.get('prebuilt_reason')})"
                if ext.get("prebuilt") and not ext.get("prebuilt_used")
                else ""
            )
        )
    lines.append("")

    phase_rows = [r for r in rows if r.get("kind") == "phase"]
    lines += ["## Phases", ""]
    table = []
    for p in phase_rows:
        n_ok = sum(
            1
            for r in rows
            if row_phase(r) == p["phase"]
            and r.get("status") == "ok"
            and r.get("kind") not in ("phase", "step", "pytest")
        )
        if p["phase"] == "tests":
            n_ok = sum(1 for r in rows if r.get("kind") == "test" and r.get("outcome") == "passed")
        steps = [r for r in rows if r.get("phase") == p["phase"] and r.get("kind") == "step"]
        skipped = [r["step"] for r in steps if r.get("status") == "skipped"]
        failed = [r["step"] for r in steps if r.get("status") == "done" and r.get("result") != "ok"]
        table.append(
            [
                p["phase"],
                p["status"],
                _f(p.get("wall_s"), ".0f"),
                _f(p.get("est_s"), ".0f"),
                _f(p.get("budget_s"), ".0f"),
                str(n_ok),
                ", ".join(failed) or "-",
                (", ".join(skipped) or "-") + (f" ({p['reason']})" if p.get("reason") else ""),
            ]
        )
    lines += _table(
        ["phase", "status", "wall s", "est s", "budget s", "ok rows", "steps failed", "steps skipped"], table
    ) + [""]

    tests = [r for r in rows if r.get("kind") == "test"]
    if tests or any(r.get("phase") == "tests" for r in phase_rows):
        counts: dict[str, int] = {}
        for r in tests:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        lines += ["## Tests", "", "Results: " + (", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "none")]
        bad = [r for r in tests if r["outcome"] in ("failed", "error")]
        for r in bad[:60]:
            lines.append(f"- {r['outcome']}: `{r['nodeid']}` ({r['when']}): {r.get('message')}")
        if len(bad) > 60:
            lines.append(f"- ... {len(bad) - 60} more in gpu_session.jsonl")
        lines.append("")

    att = [r for r in rows if r.get("kind") == "attention"]
    if att:
        lines += ["## Attention (p50 us, TFLOP/s at p50; x = competitor p50 / fastenc-triton p50)", ""]
        cases: dict[tuple, dict] = {}
        for r in att:
            c = r["config"]
            key = (c["S"], c["D"], c["H"], c["B"], c["causal"], c["padding"], c["relbias"], c["dtype"])
            cases.setdefault(key, {})[r["competitor"]] = r
        comps = list(ATTENTION_COMPETITORS)
        table = []
        for (sq, d, h, b, causal, pad, rel, dt), group in cases.items():
            mask = "+".join(x for x, on in (("causal", causal), ("pad", pad), ("relbias", rel)) if on) or "-"
            fast = group.get("fastenc-triton", {})
            cells = [f"B{b} H{h} S{sq} D{d}", mask, dt]
            for name in comps:
                r = group.get(name)
                if r is None:
                    cells.append("-")
                elif r.get("status") != "ok":
                    cells.append(r.get("status", "?"))
                else:
                    x = (
                        r["p50_ms"] / fast["p50_ms"]
                        if fast.get("status") == "ok" and name != "fastenc-triton"
                        else None
                    )
                    cells.append(f"{r['p50_ms'] * 1e3:.1f} / {r['tflops']:.1f}" + (f" ({x:.2f}x)" if x else ""))
            table.append(cells)
        lines += _table(["case", "mask", "dtype", *comps], table) + [""]

    towers = [r for r in rows if "config" in r and "competitor" in (r.get("config") or {}) and "run_id" in r]
    if towers:
        lines += ["## Towers (one request at a time, L2 flushed; MFU against the in-run GEMM peak)", ""]
        by_case: dict[tuple, dict] = {}
        for r in towers:
            c = r["config"]
            by_case.setdefault((c["label"], c["dtype"], c["batch"], c["seq"]), {})[c["competitor"]] = r
        table = []
        for (label, dt, b, seq), group in by_case.items():
            base = group.get("sdpa") if (group.get("sdpa") or {}).get("status") == "ok" else None
            for name, r in group.items():
                if r.get("status") != "ok":
                    table.append(
                        [
                            label,
                            dt,
                            str(b),
                            str(seq),
                            name,
                            r.get("status"),
                            "",
                            "",
                            "",
                            "",
                            "",
                            "",
                            (r.get("reason") or "")[:160],
                        ]
                    )
                    continue
                x = base["p50_ms"] / r["p50_ms"] if base else None
                table.append(
                    [
                        label,
                        dt,
                        str(b),
                        str(seq),
                        name,
                        _f(r["p50_ms"]),
                        _f(r.get("p90_ms")),
                        _f(r.get("items_per_s"), ".1f"),
                        _f(r.get("throughput_items_per_s"), ".1f"),
                        _f(r.get("tflops"), ".1f"),
                        _f(r.get("mfu"), ".1%"),
                        _f(x, ".2f"),
                        f"first call {_f(r.get('first_call_s'), '.1f')} s; err {_f(r.get('check_max_rel'), '.1e')}",
                    ]
                )
        lines += _table(
            [
                "model",
                "dtype",
                "batch",
                "seq",
                "competitor",
                "p50 ms",
                "p90 ms",
                "items/s",
                "stream items/s",
                "TFLOP/s",
                "MFU",
                "x vs sdpa",
                "notes",
            ],
            table,
        ) + [""]

    nan = [r for r in rows if r.get("kind") == "nan_check"]
    if nan:
        lines += ["## T5 finiteness (whole output; error against fp32 sdpa, same weights)", ""]
        lines += _table(
            ["model", "dtype", "competitor", "status", "non-finite", "max abs err", "max rel err"],
            [
                [
                    r["config"]["model"],
                    r["config"]["dtype"],
                    r["competitor"],
                    r["status"],
                    str(r.get("nonfinite", "-")),
                    _f(r.get("max_abs_err"), ".3e"),
                    _f(r.get("max_rel_err"), ".3e"),
                ]
                for r in nan
            ],
        ) + [""]

    loss = [r for r in rows if r.get("kind") == "loss"]
    if loss:
        lines += ["## Losses (forward + backward; peak = growth over the inputs)", ""]
        lines += _table(
            ["loss", "dtype", "N", "d", "provider", "status", "p50 ms", "TFLOP/s", "peak MiB"],
            [
                [
                    r["loss"],
                    r["config"]["dtype"],
                    str(r["config"]["N"]),
                    str(r["config"]["d"]),
                    r["provider"],
                    r["status"],
                    _f(r.get("p50_ms")),
                    _f(r.get("tflops"), ".1f"),
                    _f(r.get("peak_mem_delta_mb"), ".0f"),
                ]
                for r in loss
            ],
        ) + [""]

    emb = [r for r in rows if r.get("kind") == "embed"]
    if emb:
        lines += ["## Embedding pipeline (bench/bench_embed.py; clip-retrieval: 312 samples/s per A100)", ""]
        lines += _table(
            ["shape", "batch", "dtype", "workers", "provider", "samples/s", "pipeline / model-only", "model busy"],
            [
                [
                    r["shape"],
                    str(r["batch"]),
                    r["dtype"],
                    str(r["workers"]),
                    r["provider"],
                    _f(r.get("samples_per_s"), ".0f"),
                    _f(r.get("pipeline_over_model_only"), ".2f"),
                    _f(r.get("model_busy"), ".2f"),
                ]
                for r in emb
            ],
        ) + [""]

    train = [r for r in rows if r.get("kind") == "training"]
    if train:
        lines += ["## Training (bench/bench_training.py; goal: CLIP B/16 >= 1.3x transformers at <= its memory)", ""]
        lines += _table(
            ["case", "provider", "status", "p50 ms", "samples/s or tokens/s", "peak MiB", "speedup", "mem ratio"],
            [
                [
                    (r.get("config") or {}).get("model", r["case"]),
                    r["provider"],
                    r["status"],
                    _f(r.get("p50_ms"), ".1f"),
                    _f(r.get("samples_per_s") or r.get("tokens_per_s"), ".0f"),
                    _f(r.get("peak_mem_mb"), ".0f"),
                    _f(r.get("speedup_vs_transformers"), ".2f"),
                    _f(r.get("mem_ratio_vs_transformers"), ".2f"),
                ]
                for r in train
            ],
        ) + [""]

    failed = [r for r in rows if r.get("kind") not in ("step", "phase") and r.get("status") in ("error", "timeout")]
    failed += [
        r
        for r in rows
        if r.get("kind") == "step"
        and (r.get("result") == "timeout" or str(r.get("reason")).startswith("the child exited"))
    ]
    failed += [r for r in rows if r.get("kind") == "phase" and r.get("status") in ("error", "timeout")]
    failed += [r for r in loss if r.get("provider") == "fastenc" and r.get("status") != "ok"]
    failed += [
        dict(r, reason=f"{r['nonfinite']} non-finite values")
        for r in nan
        if r.get("nonfinite") and str(r.get("competitor", "")).startswith("fastenc")
    ]
    failed += [r for r in tests if r["outcome"] in ("failed", "error")]
    lines += ["## What failed", ""]
    if not failed:
        lines.append("nothing")
    for r in failed[:80]:
        what = (
            r.get("nodeid")
            or "/".join(str(x) for x in (r.get("phase"), r.get("step"), r.get("competitor")) if x)
            or r.get("kind")
        )
        why = r.get("reason") or r.get("message") or "; ".join(r.get("notes") or [])
        lines.append(f"- {r.get('kind')} {what}: {str(why)[:300]}")
    return "\n".join(lines) + "\n"


def write_summary(out: Path, session_id: str) -> str:
    text = summary_text(read_rows(out / ROWS_FILE), session_id)
    tmp = out / (SUMMARY_FILE + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out / SUMMARY_FILE)
    return text


# ---------------------------------------------------------------------------------------------------- prebuild


def prebuild(dest: Path) -> int:
    """On the CPU machine, with the GPU machine's torch (2.11.0+cu130) and nvcc: build csrc/ into
    dest/fastenc_cuda_prebuilt.so (+ meta.json), the flags of fastenc's JIT build, for TORCH_CUDA_ARCH_LIST (default
    9.0a). Carry dest with the device call; the session loads it instead of building (its meta must match)."""
    import tempfile

    import torch
    from torch.utils import cpp_extension

    from fastenc.core import cuda as _cuda

    if not torch.version.cuda:
        print(
            f"gpu_session --prebuild: torch {torch.__version__} is a CPU build; run this with the GPU machine's "
            "torch (2.11.0+cu130) installed, e.g. in a venv",
            file=sys.stderr,
        )
        return 2
    if cpp_extension.CUDA_HOME is None:
        print("gpu_session --prebuild: nvcc / CUDA_HOME not found", file=sys.stderr)
        return 2
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    build = Path(tempfile.mkdtemp(prefix="fastenc-prebuild-"))
    t0 = time.perf_counter()
    cpp_extension.load(
        name=PREBUILT_NAME,
        sources=[str(p) for p in _cuda._sources()],
        extra_include_paths=[str(_cuda.CSRC)],
        extra_cuda_cflags=["-O3", "-std=c++17"],
        extra_cflags=["-O3"],
        build_directory=str(build),
        is_python_module=False,
        verbose=True,
    )
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build / f"{PREBUILT_NAME}.so", dest / f"{PREBUILT_NAME}.so")
    meta = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "source_hash": _cuda.source_hash(),
        "arch_list": os.environ["TORCH_CUDA_ARCH_LIST"],
        "python": platform.python_version(),
        "build_s": time.perf_counter() - t0,
        "time": utc_now(),
    }
    (dest / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(build, ignore_errors=True)
    print(f"gpu_session --prebuild: {dest / (PREBUILT_NAME + '.so')} in {meta['build_s']:.0f} s; carry {dest}")
    return 0


# ---------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", action="store_true", help="print the phases and estimated durations, run nothing")
    p.add_argument("--dry-run", action="store_true", help="every phase on the CPU at tiny sizes (Triton interpreter)")
    p.add_argument("--out", help="folder for the rows and the summary (default $OUT, else ./gpu-session-out)")
    p.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S, help="overall seconds (default 510)")
    p.add_argument("--phases", help=f"comma list, run in priority order (default all: {', '.join(PHASES_BY_NAME)})")
    p.add_argument("--commit", help="the commit the tree is at (the device copy has no .git)")
    p.add_argument("--prebuilt", help=f"carried CUDA ops library (default {PREBUILT_DIR.name}/{PREBUILT_NAME}.so)")
    p.add_argument("--prebuild", metavar="DIR", help="build the CUDA ops into DIR here (needs torch 2.11+cu130)")
    # internal: one phase in a child process
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--until", type=float, help=argparse.SUPPRESS)
    p.add_argument("--session", help=argparse.SUPPRESS)
    p.add_argument("--skip-steps", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plan:
        names = set(filter(None, (args.phases or ",".join(PHASES_BY_NAME)).split(",")))
        print(plan_text([ph for ph in PHASES if ph.name in names], args.deadline))
        return 0
    if args.prebuild:
        return prebuild(Path(args.prebuild))
    if args.child:
        signal.signal(signal.SIGTERM, _on_sigterm)
        if str(HERE) not in sys.path:
            sys.path.insert(0, str(HERE))  # bench_attention, bench_contrastive, _common
        how = ensure_importable()
        phase = PHASES_BY_NAME[args.child]
        session = Session(args, phase)
        session.row("phase_start", status="start", steps=[st.name for st in phase.steps], pid=os.getpid(), fastenc=how)
        globals()[phase.run](session)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # every row is written already; skip interpreter / CUDA teardown (seconds, and can hang)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())

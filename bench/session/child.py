"""The child side: one phase in its own process. Session is what a phase's run(s) gets: the row writer, the
dry-run flag, the phase's deadline, torch set up on the device, and run_steps (per-step budget checks, rows and
failure handling)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from .common import (
    CHILD_PROCS,
    ENV_FAULT,
    ROWS_FILE,
    Phase,
    append_row,
    ensure_importable,
    load_prebuilt,
    short,
    utc_now,
)


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
                status, reason = "error", short(e)
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


def _on_sigterm(signum, frame):  # the parent's timeout: end the pytest (or build) this child started, then exit
    for proc in list(CHILD_PROCS):
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
    os._exit(124)


def child_main(args, phase: Phase) -> None:
    """Run `phase` in this process, then exit without interpreter teardown."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    how = ensure_importable()
    session = Session(args, phase)
    session.row("phase_start", status="start", steps=[st.name for st in phase.steps], pid=os.getpid(), fastenc=how)
    phase.run(session)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # every row is written already; skip interpreter / CUDA teardown (seconds, and can hang)

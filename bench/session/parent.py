"""The parent side: runs each phase in child processes (restarted on the steps not reached after a crash, killed at
its budget or the overall deadline), writes the session / phase rows and the summary after every phase. The parent
never touches CUDA."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from .common import (
    CHILD_START_S,
    ENTRY,
    ENV_META,
    ENV_PREBUILT,
    ENV_ROWS,
    LOG_KEEP_BYTES,
    MAX_RESTARTS,
    PREBUILT_DIR,
    PREBUILT_NAME,
    PYTEST_LOG,
    REPO,
    ROWS_FILE,
    SESSION_LOG,
    SUMMARY_RESERVE_S,
    Phase,
    append_row,
    cmd,
    read_rows,
    smi_snapshot,
    utc_now,
)
from .plan import PHASES, PHASES_BY_NAME
from .summary import write_summary


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
        cap = cmd(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"])
        if cap and cap.splitlines()[0].strip().replace(".", "").isdigit():
            c = cap.splitlines()[0].strip()
            env["TORCH_CUDA_ARCH_LIST"] = c + ("a" if c == "9.0" else "")
    lib = Path(args.prebuilt) if args.prebuilt else PREBUILT_DIR / f"{PREBUILT_NAME}.so"
    if lib.exists():
        env[ENV_PREBUILT] = str(lib.resolve())
    return env


def _run_child(argv: list[str], env: dict, log: Path, until: float) -> tuple[int | None, bool]:
    """(exit status, timed out) of one child, its output appended to `log`; at `until` its process group gets
    SIGTERM (the child kills its pytest, then exits), SIGKILL 5 s later."""
    with log.open("a") as logf:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=max(1.0, until - time.time())), False
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = proc.returncode
        with contextlib.suppress(OSError):  # anything of the child's group still running (compile workers)
            os.killpg(proc.pid, signal.SIGKILL)
    return rc, timed_out


def run_phase(
    args, phase: Phase, out: Path, env: dict, session_id: str, commit: str, deadline: float, log_rows
) -> dict:
    """Run one phase in child processes (restarted after a crash on the steps not reached); returns its row."""
    rows_path = out / ROWS_FILE
    t0 = time.time()
    phase_until = min(t0 + phase.budget_s, deadline - SUMMARY_RESERVE_S)
    skip: set[str] = set()
    attempts, status, rc, notes = 0, "ok", None, []

    def step_rows() -> list[dict]:
        rows = read_rows(rows_path)
        return [
            r for r in rows if (r.get("session"), r.get("phase"), r.get("kind")) == (session_id, phase.name, "step")
        ]

    def step_row(name: str, **fields) -> None:
        base = dict(session=session_id, phase=phase.name, step=name, kind="step", time=utc_now(), commit=commit)
        log_rows({**base, **fields, "dry_run": args.dry_run})

    while True:
        argv = [sys.executable, str(ENTRY), "--child", phase.name, "--out", str(out), "--until", repr(phase_until),
                "--session", session_id, "--commit", commit]  # fmt: skip
        argv += ["--dry-run"] if args.dry_run else []
        argv += ["--skip-steps", ",".join(sorted(skip))] if skip else []
        with (out / SESSION_LOG).open("a") as logf:
            logf.write(f"\n===== {utc_now()} phase {phase.name} attempt {attempts + 1}: {' '.join(argv[2:])}\n")
        rc, timed_out = _run_child(argv, env, out / SESSION_LOG, phase_until)
        _end_orphans(rows_path, session_id, phase.name)
        mine = step_rows()
        started = {r["step"] for r in mine if r.get("status") == "start"}
        finished = {r["step"] for r in mine if r.get("status") in ("done", "skipped")}
        cut = sorted(started - finished - skip)
        for name in cut:
            why = (
                f"killed at the phase's deadline ({phase.budget_s:g} s budget or the overall deadline)"
                if timed_out
                else f"the child exited with status {rc} during this step (crash or lost CUDA context)"
            )
            step_row(name, status="done", result="timeout" if timed_out else "error", reason=why)
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
    seen = {r["step"] for r in step_rows()}
    for st in phase.steps:  # every step ends with a row, the ones the phase never reached included
        if st.name not in seen:
            step_row(st.name, status="skipped", reason=f"skipped: not reached (the phase ended: {status})")
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

"""The Markdown summary <out>/gpu_session.md: a header (device, versions, clocks, peak), the phases table, each
phase's own section (its PHASE.summary) and "What failed" (error / timeout rows of every phase plus each
PHASE.failures)."""

from __future__ import annotations

import os
from pathlib import Path

from . import env as env_phase
from .common import ROWS_FILE, SUMMARY_FILE, fmt, md_table, read_rows
from .plan import PHASES


def row_phase(r: dict) -> str | None:
    """The phase of a row: its own field, or for the runner's tower rows the one in their label."""
    if r.get("phase"):
        return r["phase"]
    label = r.get("label") or ""
    return label.split()[-1].split("/")[0] if label.startswith("gpu-session ") else None


def _header(rows: list[dict], session_id: str) -> list[str]:
    start = next((r for r in rows if r.get("kind") == "session" and r.get("status") == "start"), {})
    end = next((r for r in rows if r.get("kind") == "session" and r.get("status") == "end"), None)
    env = next((r for r in rows if r.get("kind") == "env"), {})
    dry = " (dry run: CPU, tiny shapes; timings mean nothing)" if start.get("dry_run") else ""
    device = (
        f"- device: {env.get('device', '?')}; commit {start.get('commit')} ({start.get('commit_source')}); "
        f"started {start.get('time')}" + (f"; wall {end['wall_s']:.0f} s" if end else "; not finished")
    )
    return [f"# GPU session {session_id}{dry}", "", device, *env_phase.header(rows, end), ""]


def _phases_table(rows: list[dict]) -> list[str]:
    table = []
    for p in (r for r in rows if r.get("kind") == "phase"):
        if p["phase"] == "tests":
            n_ok = sum(1 for r in rows if r.get("kind") == "test" and r.get("outcome") == "passed")
        else:
            n_ok = sum(
                1
                for r in rows
                if row_phase(r) == p["phase"]
                and r.get("status") == "ok"
                and r.get("kind") not in ("phase", "step", "pytest")
            )
        steps = [r for r in rows if r.get("phase") == p["phase"] and r.get("kind") == "step"]
        skipped = [r["step"] for r in steps if r.get("status") == "skipped"]
        failed = [r["step"] for r in steps if r.get("status") == "done" and r.get("result") != "ok"]
        why = f" ({p['reason']})" if p.get("reason") else ""
        table.append([p["phase"], p["status"], fmt(p.get("wall_s"), ".0f"), fmt(p.get("est_s"), ".0f"),
                      fmt(p.get("budget_s"), ".0f"), str(n_ok), ", ".join(failed) or "-",
                      (", ".join(skipped) or "-") + why])  # fmt: skip
    head = ["phase", "status", "wall s", "est s", "budget s", "ok rows", "steps failed", "steps skipped"]
    return ["## Phases", "", *md_table(head, table), ""]


def _failed(rows: list[dict]) -> list[str]:
    """Error / timeout rows, steps cut by a timeout or a dead child, failed phases, then each phase's own."""
    failed = [r for r in rows if r.get("kind") not in ("step", "phase") and r.get("status") in ("error", "timeout")]
    failed += [
        r
        for r in rows
        if r.get("kind") == "step"
        and (r.get("result") == "timeout" or str(r.get("reason")).startswith("the child exited"))
    ]
    failed += [r for r in rows if r.get("kind") == "phase" and r.get("status") in ("error", "timeout")]
    for p in PHASES:
        if p.failures:
            failed += p.failures(rows)
    lines = ["## What failed", ""]
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
    return lines


def summary_text(rows: list[dict], session_id: str) -> str:
    """The summary of one session's rows (other sessions' rows in the same file are ignored)."""
    rows = [
        r
        for r in rows
        if r.get("session") == session_id or (r.get("label") or "").startswith(f"gpu-session {session_id} ")
    ]
    lines = _header(rows, session_id) + _phases_table(rows)
    for p in PHASES:
        if p.summary:
            lines += p.summary(rows)
    return "\n".join(lines + _failed(rows)) + "\n"


def write_summary(out: Path, session_id: str) -> str:
    text = summary_text(read_rows(out / ROWS_FILE), session_id)
    tmp = out / (SUMMARY_FILE + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out / SUMMARY_FILE)
    return text

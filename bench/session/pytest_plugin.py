"""pytest plugin, active in the pytest that the tests phase starts (`-p session.pytest_plugin`, bench/ on
PYTHONPATH): one row per test result, appended to the session's rows as it happens."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from .common import ENV_META, ENV_PREBUILT, ENV_ROWS, ENV_STEP, append_row, ensure_importable, load_prebuilt, utc_now


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

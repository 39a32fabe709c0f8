"""bench/gpu_session.py's package: one module per phase (env, tests, attention, towers, losses, embed, training:
its steps, its run(session) calling the bench scripts' own functions, its summary lines), plus the plan, the child
side (Session, run_steps), the parent side (phases in child processes, restarts, deadlines), the summary and what
they share (common). Imported as `session` with bench/ on sys.path, as `python bench/gpu_session.py` has it; the
names below are the ones the entry and tests/test_gpu_session.py use."""

from .attention import COMPETITORS as ATTENTION_COMPETITORS
from .common import (
    DEFAULT_DEADLINE_S,
    DEVICE_CALL_S,
    ENV_FAULT,
    ENV_PREBUILT,
    PREBUILT_DIR,
    PREBUILT_NAME,
    PYTEST_LOG,
    ROWS_FILE,
    SESSION_LOG,
    SUMMARY_FILE,
    ensure_importable,
    load_prebuilt,
)
from .embed import DRY as DRY_EMBED
from .plan import PHASES, PHASES_BY_NAME, plan_text
from .summary import row_phase, summary_text

__all__ = [
    "ATTENTION_COMPETITORS",
    "DEFAULT_DEADLINE_S",
    "DEVICE_CALL_S",
    "DRY_EMBED",
    "ENV_FAULT",
    "ENV_PREBUILT",
    "PHASES",
    "PHASES_BY_NAME",
    "PREBUILT_DIR",
    "PREBUILT_NAME",
    "PYTEST_LOG",
    "ROWS_FILE",
    "SESSION_LOG",
    "SUMMARY_FILE",
    "ensure_importable",
    "load_prebuilt",
    "plan_text",
    "row_phase",
    "summary_text",
]

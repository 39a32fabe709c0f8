"""The plan: the phases in priority order (each phase module's PHASE; adding one is a module plus its entry here),
and the --plan text."""

from __future__ import annotations

from . import attention, embed, env, losses, tests, towers, training
from .common import DEFAULT_DEADLINE_S, DEVICE_CALL_S

PHASES = tuple(m.PHASE for m in (env, tests, attention, towers, losses, embed, training))
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

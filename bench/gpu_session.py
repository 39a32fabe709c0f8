"""One prepared GPU session: everything a session lent a GPU should measure, in one device call of <= 9 minutes.

    python bench/gpu_session.py --plan                      # the phases, their steps and estimated durations
    python bench/gpu_session.py --dry-run --out /tmp/gs     # every phase on the CPU at tiny sizes (CI runs this)
    python bench/gpu_session.py --commit SHA                # on the GPU machine: rows to $OUT (or --out DIR)
    python bench/gpu_session.py --phases towers,losses --deadline 200    # a rerun of some phases
    python bench/gpu_session.py --prebuild .cuda-prebuilt   # CPU machine, torch 2.11+cu130: build the CUDA ops

Phases, in priority order: env, tests, attention, towers, losses, embed, training; each is a module of
bench/session/ (its steps, estimates, and a run that calls the bench scripts' own functions), listed in
session/plan.py.

How it keeps a lease from being wasted: the parent process never touches CUDA. Each phase runs in its own child
process with its own budget and the overall deadline (a crashed kernel or a poisoned CUDA context costs one phase
at most: the child is restarted on the steps it had not reached). A phase is skipped ("skipped: deadline") when
the time left is below its estimate, a step likewise. Every row is appended to <out>/gpu_session.jsonl (flushed and
fsynced) the moment it exists, so a timeout still returns everything measured so far; the Markdown summary
<out>/gpu_session.md is rewritten after every phase. Files under <out>: gpu_session.jsonl, gpu_session.md,
pytest.log, session.log (the children's output, tail-trimmed) - four files, well under the device tool's eight.
Method and the device-tool call: bench/README.md, "GPU session".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # the session package and the bench scripts its phases call

from session import (  # noqa: E402
    DEFAULT_DEADLINE_S,
    PHASES,
    PHASES_BY_NAME,
    PREBUILT_DIR,
    PREBUILT_NAME,
    ensure_importable,  # noqa: F401 - the entry's import of fastenc from a checkout, as tests use it
    plan_text,
)


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
        from session.prebuild import prebuild

        return prebuild(Path(args.prebuild))
    if args.child:
        from session.child import child_main

        child_main(args, PHASES_BY_NAME[args.child])  # exits
    from session.parent import parent_main

    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())

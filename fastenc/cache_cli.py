"""`fastenc cache`: list fastenc's caches with their sizes, and clear them.

    fastenc cache [--json]                                   every cache: path, entries, bytes
    fastenc cache --clear [--what onnx|prompts|digests|cuda|autotune|all] [--prompt-cache DIR ...]

The caches (each a folder fastenc writes without being given a path):
  onnx      $FASTENC_CACHE/onnx        ONNX exports of `optimize(backend="onnxruntime")` (fastenc.runtime.cache_dir())
  prompts   $FASTENC_CACHE/prompts     PromptCache entry files; `--prompt-cache DIR` adds a folder you gave
                                       `PromptCache(path=DIR)` (PromptCache itself writes no folder unless given one)
  digests   $FASTENC_CACHE/digests     `fastenc embed`'s weight-file digests (a resume does not re-hash)
  cuda      $FASTENC_CUDA_CACHE        the JIT build of the CUDA extension (default ~/.cache/fastenc/cuda)
  autotune  $TRITON_CACHE_DIR          Triton's kernel + autotuning cache (default ~/.triton/cache), shared with every
                                       Triton program: only the entries of fastenc's own kernels are counted / cleared
$FASTENC_CACHE defaults to ~/.cache/fastenc ($XDG_CACHE_HOME respected).

Clearing removes only entries whose names are the ones fastenc writes there (an ONNX export folder
`<Class>-<hex key>`, a prompt entry `<sha256>.safetensors`, `files.json`, a `torch*-cu*-<hash>` build, a Triton entry
whose every file belongs to a fastenc kernel, and these writers' temporary files). Anything else in a cache folder
(a file of yours, a symlink) makes `--clear` refuse before it removes anything: one `fastenc cache: error:` line
naming the path, exit status 2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ._cli_common import fail
from .core.files import human_bytes

KINDS = ("onnx", "prompts", "digests", "cuda", "autotune")

_TMP = r"\..+\.tmp(-.+)?"  # a writer's temporary file: .<name>.<pid>.<hex>.tmp (fastenc.core.files.atomic_write_bytes),
# .<name>.tmp-<pid>-<tid> (runtime's optimised-graph save)
_ENTRY_NAMES = {
    "onnx": re.compile(rf"[A-Za-z_][A-Za-z0-9_]*-[0-9a-f]{{8,64}}|{_TMP}"),
    "prompts": re.compile(rf"[0-9a-f]{{64}}\.safetensors|{_TMP}"),
    "digests": re.compile(rf"files\.json|{_TMP}"),
    "cuda": re.compile(r"torch.+-cu.+-[0-9a-f]{16}"),
}


@dataclass
class CacheDir:
    kind: str
    path: Path
    note: str = ""
    entries: list[Path] = field(default_factory=list)  # what --clear removes
    foreign: list[Path] = field(default_factory=list)  # names fastenc does not write there (refused by --clear)
    entry_bytes: int = 0
    other_bytes: int = 0  # autotune: the rest of Triton's shared cache (never cleared)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "path": str(self.path),
            "exists": self.path.exists(),
            "entries": len(self.entries),
            "bytes": self.entry_bytes,
            "foreign": [str(p) for p in self.foreign],
            "other_bytes": self.other_bytes,
            "note": self.note,
        }


def _size(path: Path) -> int:
    """Bytes under `path` (a file, or a folder walked without following symlinks)."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    total = 0
    for root, dirs, files in os.walk(path, followlinks=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _children(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        return [path]  # the cache path itself is a file: foreign


def _scan(kind: str, path: Path, note: str = "") -> CacheDir:
    c = CacheDir(kind, path, note)
    if path.exists() and not path.is_dir():
        c.foreign.append(path)
        return c
    pattern = _ENTRY_NAMES[kind]
    for p in _children(path):
        if p.is_symlink() or not pattern.fullmatch(p.name):
            c.foreign.append(p)
            c.other_bytes += _size(p)
        else:
            c.entries.append(p)
            c.entry_bytes += _size(p)
    return c


def fastenc_kernel_names() -> set[str]:
    """The names of fastenc's Triton kernels (functions under a `@triton.*` decorator in fastenc.kernels), read from
    the sources with ast: Triton names its cache files after them."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("fastenc.kernels")
    names: set[str] = set()
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for src in Path(folder).glob("*.py"):
            for node in ast.walk(ast.parse(src.read_text(encoding="utf-8"))):
                if isinstance(node, ast.FunctionDef) and any("triton" in ast.unparse(d) for d in node.decorator_list):
                    names.add(node.name)
    return names


def triton_cache_dir() -> Path:
    """Triton's cache folder as Triton resolves it: $TRITON_CACHE_DIR, else $TRITON_HOME (or ~)/.triton/cache."""
    env = os.environ.get("TRITON_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("TRITON_HOME") or os.path.expanduser("~")) / ".triton" / "cache"


def _scan_autotune(path: Path) -> CacheDir:
    """Triton's cache: one folder per compiled kernel (files `<kernel>.json`, `.ttir`, `.cubin`, ...,
    `__grp__<kernel>.json`, `<kernel>.autotune.json`). An entry is fastenc's when every file in it is named after a
    fastenc kernel; the rest is other programs' and is never touched."""
    c = CacheDir("autotune", path, "Triton's cache, shared with every Triton program: only fastenc's kernels count")
    if path.exists() and not path.is_dir():
        c.foreign.append(path)
        return c
    kernels = fastenc_kernel_names()
    for p in _children(path):
        ours = False
        if p.is_dir() and not p.is_symlink():
            stems = {f.name.split(".", 1)[0].removeprefix("__grp__") for f in p.iterdir()}
            ours = bool(stems) and stems <= kernels
        if ours:
            c.entries.append(p)
            c.entry_bytes += _size(p)
        else:
            c.other_bytes += _size(p)  # another program's: not foreign to refuse on, just not ours
    return c


def scan_caches(prompt_dirs: list[str] | None = None) -> list[CacheDir]:
    from .core.cuda import ENV_CACHE as CUDA_ENV
    from .runtime import cache_dir

    root = cache_dir()
    caches = [_scan("onnx", root / "onnx", "ONNX Runtime exports (optimize(backend='onnxruntime'))")]
    caches.append(_scan("prompts", root / "prompts", "PromptCache entries"))
    for d in prompt_dirs or ():
        caches.append(_scan("prompts", Path(d).expanduser(), "PromptCache entries (--prompt-cache)"))
    caches.append(_scan("digests", root / "digests", "fastenc embed's weight-file digests"))
    cuda_root = Path(os.environ.get(CUDA_ENV) or Path.home() / ".cache" / "fastenc" / "cuda")
    caches.append(_scan("cuda", cuda_root, "the CUDA extension's JIT build"))
    caches.append(_scan_autotune(triton_cache_dir()))
    return caches


def _table(caches: list[CacheDir]) -> str:
    from .runtime import cache_dir

    lines = [f"fastenc caches (FASTENC_CACHE={cache_dir()}):"]
    for c in caches:
        if not c.path.exists():
            what = "absent"
        else:
            what = f"{len(c.entries)} entr{'y' if len(c.entries) == 1 else 'ies'}, {human_bytes(c.entry_bytes)}"
        extra = ""
        if c.kind == "autotune" and c.other_bytes:
            extra = f" (+{human_bytes(c.other_bytes)} of other programs' kernels, not fastenc's)"
        elif c.foreign:
            extra = f" ({len(c.foreign)} item(s) fastenc did not write there, e.g. {c.foreign[0].name!r})"
        lines.append(f"  {c.kind:<9} {str(c.path):<48} {what}{extra}  [{c.note}]")
    total = human_bytes(sum(c.entry_bytes for c in caches))
    lines.append(f"total: {total} (clear with `fastenc cache --clear --what ...`)")
    return "\n".join(lines)


def clear_caches(caches: list[CacheDir], what: str) -> tuple[int, int]:
    """Remove the entries of the caches of kind `what` ("all": every kind). Refuses (InputError naming the path)
    when one of those cache folders holds anything fastenc does not write there, before anything is removed.
    Returns (entries removed, bytes freed)."""
    from .core.errors import InputError

    chosen = [c for c in caches if what == "all" or c.kind == what]
    for c in chosen:
        if c.foreign and c.kind != "autotune":
            p = c.foreign[0]
            kind = "a symlink" if p.is_symlink() else ("a folder" if p.is_dir() else "a file")
            raise InputError(
                f"refusing to clear the {c.kind} cache {str(c.path)!r}: {str(p)!r} is {kind} fastenc does not "
                f"write there ({len(c.foreign)} such item(s)); nothing was removed. Move it away, or point "
                f"$FASTENC_CACHE at a folder of fastenc's own"
            )
    removed = freed = 0
    for c in chosen:
        for p in c.entries:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
            removed += 1
        freed += c.entry_bytes
    return removed, freed


def add_cache_parser(sub) -> None:
    s = sub.add_parser("cache", help="list fastenc's caches (ONNX exports, prompt cache, digests, CUDA build, Triton "
                       "kernels) with their sizes; --clear removes them")  # fmt: skip
    s.add_argument("--clear", action="store_true", help="remove the entries of the caches named by --what")
    s.add_argument("--what", default="all", choices=[*KINDS, "all"], help="which cache --clear empties (default all)")
    s.add_argument("--prompt-cache", action="append", default=None, metavar="DIR",
                   help="a PromptCache(path=DIR) folder to list / clear too (repeatable)")  # fmt: skip
    s.add_argument("--json", action="store_true", help="print the listing (and what was cleared) as JSON")
    s.set_defaults(func=cmd_cache)


def cmd_cache(args) -> int:
    from .core.errors import InputError

    try:
        if args.what != "all" and not args.clear:
            raise InputError(f"--what {args.what} applies with --clear (the listing shows every cache)")
        caches = scan_caches(args.prompt_cache)
        cleared = None
        if args.clear:
            removed, freed = clear_caches(caches, args.what)
            cleared = {"what": args.what, "entries": removed, "bytes": freed}
            caches = scan_caches(args.prompt_cache)
    except OSError as e:
        return fail("cache", InputError(f"{e.filename or ''}: {e.strerror or e}"))
    if args.json:
        out = {"caches": [c.to_dict() for c in caches]}
        if cleared is not None:
            out["cleared"] = cleared
        print(json.dumps(out, indent=2))
        return 0
    if cleared is not None:
        print(f"cleared {cleared['entries']} entr{'y' if cleared['entries'] == 1 else 'ies'} "
              f"({human_bytes(cleared['bytes'])}) of {args.what}")  # fmt: skip
    print(_table(caches))
    sys.stdout.flush()
    return 0

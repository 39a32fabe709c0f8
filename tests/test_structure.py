"""The package's import structure (DESIGN.md "Layers": data flows down, never back up), read from the source with
`ast`: every import counts, the lazy ones inside functions too, since a lazy import is still a dependency.

- no circle: no module reaches itself through imports (the package root `fastenc/__init__.py` included, so an
  internal `import fastenc` / `from . import __version__` that closes a loop through the root is caught);
- the layers: kernels import nothing of fastenc; the support modules (errors, tracing, backend choice, the CUDA
  loader) nothing above them; ops nothing of models or the user layer; models nothing of the user layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fastenc": ROOT / "fastenc", "fastenc.kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, base in PACKAGES.items():
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if pkg == "fastenc" and parts[:1] == ["kernels"]:
                continue  # a kernels/ symlink or copy inside the package: the top-level dir is the source
            mods[".".join([pkg, *parts])] = path
    return mods


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(name: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = name.split(".") if _is_package(name) else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _target(dotted: str) -> str | None:
    """The module of ours that importing `dotted` loads last (its deepest known prefix)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return None


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = _resolve(name, node)
                targets = [f"{mod}.{a.name}" for a in node.names]  # `from pkg import submodule` or a name in pkg
            for t in targets:
                hit = _target(t)
                if hit is not None and hit != name:
                    graph[name].add(hit)
    return graph


GRAPH = _edges()


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_reader_sees_the_package():
    assert "fastenc.kernels.attention" in MODULES and "fastenc.ops._library" in MODULES
    assert "fastenc.kernels.attention" in GRAPH["fastenc.ops._library"]  # a lazy import inside a function
    assert "fastenc.ops" in GRAPH["fastenc.models._encoder"]  # `from .. import ops`


def test_no_import_circle():
    cycle = _cycle()
    assert cycle is None, "import circle: " + " -> ".join(cycle)


SUPPORT = (  # fastenc/core/: errors, tracing and the fall-back policy, backend choice, the CUDA loader, files
    "fastenc.core",
    "fastenc._version",
)


def _layer(m: str) -> int:
    if m.startswith("fastenc.kernels"):
        return 0
    if m in SUPPORT or m.startswith("fastenc.core."):
        return 1
    if m == "fastenc.ops" or m.startswith("fastenc.ops."):
        return 2
    if m == "fastenc.models" or m.startswith("fastenc.models."):
        return 3
    return 4  # the user layer: optimize, export, cli, runtime, pipelines, ...


@pytest.mark.parametrize("layer", [0, 1, 2, 3], ids=["kernels", "support", "ops", "models"])
def test_no_import_runs_back_up(layer):
    up = sorted(
        f"{m} -> {n}" for m, targets in GRAPH.items() if _layer(m) == layer for n in targets if _layer(n) > layer
    )
    assert not up, "imports that run back up the layers: " + ", ".join(up)
    if layer == 0:
        assert all(n.startswith("fastenc.kernels") for m in GRAPH if _layer(m) == 0 for n in GRAPH[m])


# Top-level functions and classes that may share a name across the package's files, each with why: one wraps the
# other (the same operation at another level), or a name every file of one kind defines by convention.
SHARED_NAMES = {
    "clip_loss": "fastenc.distributed.clip_loss wraps fastenc.ops.clip_loss over a process group",
    "siglip_loss": "fastenc.distributed.siglip_loss wraps fastenc.ops.siglip_loss over a process group",
}


def _top_level_names() -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for mod, path in sorted(MODULES.items()):
        for node in ast.parse(path.read_text(), str(path)).body:
            defines = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if defines and not node.name.startswith("__"):
                names.setdefault(node.name, []).append(mod)
    return names


def test_no_two_package_functions_share_a_name():
    """One name, one thing: a reader who greps a function's name finds one definition (or a wrapper and what it
    wraps, listed in SHARED_NAMES with the reason)."""
    names = _top_level_names()
    shared = {n: mods for n, mods in names.items() if len(mods) > 1 and n not in SHARED_NAMES}
    assert not shared, "top-level names defined in more than one module: " + "; ".join(
        f"{n} in {', '.join(mods)}" for n, mods in sorted(shared.items())
    )
    stale = sorted(n for n in SHARED_NAMES if len(names.get(n, [])) < 2)
    assert not stale, f"SHARED_NAMES lists names that are no longer shared: {stale}"

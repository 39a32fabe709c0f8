"""Lazy public names for a package's `__init__`: each name is imported from its module on first access (PEP 562), so
importing the package costs nothing until a name is used (`fastenc --help` loads no torch)."""

from __future__ import annotations

import importlib


def lazy_names(package: str, table: dict[str, str]):
    """(`__getattr__`, `__dir__`) for package `package` whose public names live in the modules `table` gives (name ->
    relative module, e.g. ".pipeline"). A name, once imported, is cached in the package's globals."""
    import sys

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__

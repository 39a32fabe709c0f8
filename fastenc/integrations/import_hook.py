"""Run a function once a module has been imported, without importing it: at once when it already is, else from a
`sys.meta_path` finder that wraps the module's loader, calls the function right after the module's code has run,
and removes itself. The module keeps its own loader (`__loader__`, `__spec__.loader`)."""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Callable


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: hands `name`'s spec from the finders after it back with a loader that fires `callback`."""

    def __init__(self, name: str, callback: Callable[[], None]):
        self.name = name
        self.callbacks = [callback]

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _FiringLoader(spec.loader, self)
        return spec

    def fire(self) -> None:
        """Remove this finder, then call every callback (in the order they were added)."""
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for callback in self.callbacks:
            callback()


class _FiringLoader(importlib.abc.Loader):
    """The module's own loader, plus the finder's callbacks once its code has run without an error."""

    def __init__(self, loader, finder: _AfterImportFinder):
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self.loader  # the module sees its own loader (source lookups, reloads)
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.finder.fire()

    def __getattr__(self, name):
        return getattr(self.loader, name)


def run_after_import(name: str, callback: Callable[[], None]) -> None:
    """Call `callback()` now if module `name` is in sys.modules, else right after it is first imported."""
    if name in sys.modules:
        callback()
        return
    for finder in sys.meta_path:
        if isinstance(finder, _AfterImportFinder) and finder.name == name:
            if callback not in finder.callbacks:
                finder.callbacks.append(callback)
            return
    sys.meta_path.insert(0, _AfterImportFinder(name, callback))

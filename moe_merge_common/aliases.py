"""Old module paths that keep working after a module moved: ``import moe.routing`` gives the module
``moe.nn.routing`` itself (the same object, so ``isinstance`` checks and monkeypatching agree). A package lists its
moves in a table and calls ``install`` from its ``__init__``; nothing is imported until an old path is asked for."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Mapping


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, moved: Mapping[str, str]):
        self.moved = dict(moved)

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.moved:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=False)

    def create_module(self, spec):
        return importlib.import_module(self.moved[spec.name])

    def exec_module(self, module) -> None:  # already executed under its new name
        pass


def install(moved: Mapping[str, str]) -> None:
    """Serve each old module path in ``moved`` (old -> new, dotted) as the module at its new path."""
    if not any(isinstance(f, _Alias) and f.moved == dict(moved) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias(moved))  # ahead of path finders: an old file left on disk never wins

"""Lazy package exports: a package names its public objects and the module of each, resolved on first use."""
from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, where `exports[name]` is the module holding `name`.

    Modules are relative to the package (`"runtime.thinker"` in `q3lab`); importing one is deferred until
    its name is asked for, so `import q3lab` stays cheap (no pandas/matplotlib until needed).
    """
    def __getattr__(name: str):
        mod = exports.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{mod}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__

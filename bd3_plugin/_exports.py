"""Lazy public names for the subpackages' `__init__`s: `from bd3_plugin.sampling import generate` works,
and importing a subpackage costs nothing until a name is used (the lm-eval start-up hook imports
`bd3_plugin.evals` at every interpreter start)."""
from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` that imports `exports[name]` (a module of `package`) on first use."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    return __getattr__

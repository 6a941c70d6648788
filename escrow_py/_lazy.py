"""Names a package exports but imports only when first used (a PEP 562 module `__getattr__`).

    __getattr__ = lazy_names(__name__, {"Keeper": "_daemon"})  # escrow_py.keeper.Keeper from ._daemon

The package imports them for the type checker only (`if TYPE_CHECKING:`); at run time the first
`from package import Name` imports the submodule, so a process that never uses it never pays for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_names(package: str, modules: Mapping[str, str]) -> Callable[[str], object]:
    """The module `__getattr__` of `package`: each name in `modules` taken from the submodule it maps to."""

    def attribute(name: str) -> object:
        module = modules.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return attribute

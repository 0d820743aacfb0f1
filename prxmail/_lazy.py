"""Lazy re-exports for package ``__init__`` modules (PEP 562).

A package lists where each public name lives; the name's module is imported the first
time the name is used, so importing the package (or one of its light submodules, such
as the IMAP sans-I/O core) does not load trio, mail-parser or the state store.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, locations: Mapping[str, str], public: Iterable[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of a package with lazy re-exports.

    Args:
        package: The package's ``__name__``.
        locations: Public name -> the module it is imported from.
        public: The package's ``__all__``.

    Returns:
        ``(__getattr__, __dir__)`` to assign in the package's ``__init__``.
    """
    names = frozenset(public)

    def __getattr__(name: str) -> Any:
        module = locations.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        vars(sys.modules[package])[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | names)

    return __getattr__, __dir__

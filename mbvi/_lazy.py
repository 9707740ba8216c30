"""Package attributes imported on first use (PEP 562), so that importing a package
loads none of the heavy modules its names come from until one is asked for."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(
    package: str, exports: dict[str, str], namespace: dict
) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for the package ``package`` whose globals are
    ``namespace``: each name of ``exports`` ({name: module}) is imported from its module
    when first read, then kept in ``namespace``."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__

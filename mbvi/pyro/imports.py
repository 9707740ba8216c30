"""Import a user's Pyro program (or its factory) by its path ``package.module.name``,
from ``sys.path`` or else from the working directory."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from mbvi.errors import ConfigError


def import_object(path: str, kind: str = "prior program") -> Any:
    """The object at ``package.module.name``; ``ConfigError`` that says what to do if
    it cannot be imported (``kind`` names what it is in the message).  The working
    directory is searched after ``sys.path``."""
    module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(
            f"{kind} {path!r} is not an import path 'package.module.function', "
            "e.g. 'examples.mixture_prior.two_gait_prior'"
        )
    try:
        module = _import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"{kind} {path!r}: cannot import module {module_name!r} ({e}); searched "
            f"sys.path and the working directory {os.getcwd()}. Run mbvi from the folder "
            f"that holds {module_name.split('.')[0]!r}, add that folder to PYTHONPATH, or "
            "install your module (pip install -e .)"
        ) from e
    except Exception as e:
        raise ConfigError(
            f"{kind} {path!r}: importing module {module_name!r} failed: {type(e).__name__}: {e}"
        ) from e
    try:
        obj = getattr(module, attr)
    except AttributeError as e:
        public = sorted(
            k
            for k, v in vars(module).items()
            if callable(v) and k[0] != "_" and getattr(v, "__module__", None) == module_name
        )
        raise ConfigError(
            f"{kind} {path!r}: module {module_name!r} has no {attr!r}; it defines {public}"
        ) from e
    if not callable(obj):
        raise ConfigError(f"{kind} {path!r} is a {type(obj).__name__}, not a function")
    return obj


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        missing_is_ours = e.name is not None and (name + ".").startswith(e.name + ".")
        cwd = os.getcwd()
        if not missing_is_ours or cwd in sys.path or "" in sys.path:
            raise
    # A console script (``mbvi``) does not put the working directory on sys.path the way
    # ``python -m`` does; look there too, without leaving it on the path.
    sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(cwd)

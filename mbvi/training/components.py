"""A component (prior, engine, value estimate) as data: its constructor arguments, for
MLflow params and for checkpoints that rebuild it.

Components keep each constructor argument as an attribute of the same name; that is
the convention these functions read.
"""

from __future__ import annotations

import importlib
import inspect

import torch

from mbvi.errors import ConfigError


def _init_args(module: torch.nn.Module) -> tuple[dict[str, object], list[str]]:
    """(constructor argument -> the module's attribute of that name, arguments it keeps
    no attribute for); ``*args``/``**kwargs`` are skipped."""
    args, missing = {}, []
    for arg, param in list(inspect.signature(type(module).__init__).parameters.items())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if hasattr(module, arg):
            args[arg] = getattr(module, arg)
        else:
            missing.append(arg)
    return args, missing


def component_params(name: str, module: torch.nn.Module) -> dict[str, object]:
    """``{name: class name, name.arg: value}`` for a component's constructor arguments;
    a component inside a component (a value's world model) adds ``name.arg.*``."""
    args, _ = _init_args(module)
    params: dict[str, object] = {name: type(module).__name__}
    for k, v in args.items():
        if isinstance(v, torch.nn.Module):
            params.update(component_params(f"{name}.{k}", v))
        else:
            params[f"{name}.{k}"] = v
    return params


def component_spec(module: torch.nn.Module) -> dict[str, object]:
    """``{"class_path", "init_args"}`` of a component, as in a config: what a checkpoint
    keeps so that ``load_from_checkpoint`` rebuilds the same prior, engine and value.

    Raises ``ConfigError`` for a component that keeps no attribute for an argument,
    rather than let a loaded agent fall back to a default silently.
    """
    cls = type(module)
    args, missing = _init_args(module)
    if missing:
        raise ConfigError(
            f"{cls.__name__} keeps no attribute for its argument(s) {', '.join(missing)}: "
            "store each constructor argument as self.<name> so checkpoints can rebuild it"
        )
    args = {k: _spec_value(v) for k, v in args.items()}
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": args}


def _spec_value(v: object) -> object:
    if isinstance(v, torch.nn.Module):
        return component_spec(v)
    return list(v) if isinstance(v, tuple) else v


def build_component(spec: torch.nn.Module | dict | None) -> torch.nn.Module | None:
    """A component from ``component_spec``'s dict (as saved in a checkpoint), or as is."""
    if not isinstance(spec, dict):
        return spec
    module_name, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    args = {
        k: build_component(v) if isinstance(v, dict) and "class_path" in v else v
        for k, v in spec.get("init_args", {}).items()
    }
    return cls(**args)

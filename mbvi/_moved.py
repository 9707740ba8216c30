"""Module paths from before ``mbvi/`` was grouped by role, kept importable.

Checkpoints name their components by module path (``mbvi.values.TwinQ``), and users'
code imports ``mbvi.priors`` and the like: both keep working through a finder that
answers an old path with the module that now lives elsewhere.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "mbvi.distributions": "mbvi.variational.distributions",
    "mbvi.priors": "mbvi.variational.priors",
    "mbvi.objectives": "mbvi.variational.objectives",
    "mbvi.values": "mbvi.variational.values",
    "mbvi.diagnostics": "mbvi.variational.diagnostics",
    "mbvi.agent": "mbvi.training.agent",
    "mbvi.m_step": "mbvi.training.m_step",
    "mbvi.env": "mbvi.training.env",
    "mbvi.replay": "mbvi.training.replay",
    "mbvi.callbacks": "mbvi.training.callbacks",
    "mbvi.checkpoints": "mbvi.training.checkpoints",
    "mbvi.rng": "mbvi.training.rng",
    "mbvi.metrics": "mbvi.training.metrics",
    "mbvi.optim": "mbvi.training.optim",
    "mbvi.components": "mbvi.training.components",
    "mbvi.checks": "mbvi.training.checks",
    "mbvi.runs": "mbvi.tracking.runs",
    "mbvi.compare": "mbvi.tracking.compare",
    "mbvi.figures": "mbvi.tracking.figures",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:
        """The target module is already executed."""


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())

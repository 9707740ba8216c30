"""Tracking and comparison: the MLflow logger, loading runs back, ``mbvi compare``.

Names are imported on first use, so that ``mbvi compare`` and ``mbvi sweep``, which
never log through Lightning, do not import it.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RESUMED_FROM_TAG": "mbvi.tracking.uri",
    "MLflowTracker": "mbvi.tracking.logger",
    "resolve_tracking_uri": "mbvi.tracking.uri",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mbvi.tracking' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

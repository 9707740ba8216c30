"""Tracking and comparison: the MLflow logger, loading runs back, ``mbvi compare``.

Names are imported on first use, so that ``mbvi compare`` and ``mbvi sweep``, which
never log through Lightning, do not import it.
"""

from __future__ import annotations

from mbvi._lazy import lazy_exports

_EXPORTS = {
    "RESUMED_FROM_TAG": "mbvi.tracking.uri",
    "MLflowTracker": "mbvi.tracking.logger",
    "resolve_tracking_uri": "mbvi.tracking.uri",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

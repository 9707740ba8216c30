"""Tracking and comparison: the MLflow logger, loading runs back, ``mbvi compare``."""

from mbvi.tracking.logger import (
    RESUMED_FROM_TAG,
    MLflowTracker,
    resolve_tracking_uri,
)

__all__ = ["RESUMED_FROM_TAG", "MLflowTracker", "resolve_tracking_uri"]

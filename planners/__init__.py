"""Inference engines: one class per file, all behind ``InferenceEngine``."""

from mbvi.planners.base import InferenceEngine
from mbvi.planners.direct import Direct

__all__ = ["Direct", "InferenceEngine"]

"""Inference engines: one class per file, all behind ``InferenceEngine``."""

from mbvi.planners.base import InferenceEngine
from mbvi.planners.direct import Direct
from mbvi.planners.gradient import GradientRefinement
from mbvi.planners.iterative import Iterative

__all__ = ["Direct", "GradientRefinement", "InferenceEngine", "Iterative"]

"""Inference engines: one class per file, all behind ``InferenceEngine``."""

from mbvi.planners.base import InferenceEngine
from mbvi.planners.cem import CEM
from mbvi.planners.direct import Direct
from mbvi.planners.gradient import GradientRefinement
from mbvi.planners.importance import ImportanceSampling
from mbvi.planners.iterative import Iterative
from mbvi.planners.mppi import MPPI
from mbvi.planners.smc import SMC
from mbvi.planners.svgd import SVGD

__all__ = [
    "CEM",
    "MPPI",
    "SMC",
    "SVGD",
    "Direct",
    "GradientRefinement",
    "ImportanceSampling",
    "InferenceEngine",
    "Iterative",
]

"""Learnable parts of mbvi: MLPs, ensembles, critics and inference networks."""

from mbvi.models.iterative import IterativeUpdate
from mbvi.models.mlp import EnsembleLinear, EnsembleMLP, mlp
from mbvi.models.policy import GaussianHead
from mbvi.models.q import QEnsemble

__all__ = ["EnsembleLinear", "EnsembleMLP", "GaussianHead", "IterativeUpdate", "QEnsemble", "mlp"]

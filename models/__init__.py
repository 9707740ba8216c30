"""Learnable parts of mbvi: MLPs, ensembles, critics, inference and prior networks."""

from mbvi.models.iterative import IterativeUpdate
from mbvi.models.mlp import EnsembleLinear, EnsembleMLP, mlp
from mbvi.models.policy import GaussianHead
from mbvi.models.prior_net import PriorNet
from mbvi.models.q import QEnsemble

__all__ = [
    "EnsembleLinear",
    "EnsembleMLP",
    "GaussianHead",
    "IterativeUpdate",
    "PriorNet",
    "QEnsemble",
    "mlp",
]

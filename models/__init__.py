"""Learnable parts of mbvi: MLPs, ensembles, critics, inference and prior networks."""

from mbvi.models.dynamics import DynamicsEnsemble
from mbvi.models.iterative import IterativeUpdate
from mbvi.models.mlp import EnsembleLinear, EnsembleMLP, mlp
from mbvi.models.policy import GaussianHead
from mbvi.models.prior_net import PriorNet
from mbvi.models.q import QEnsemble

__all__ = [
    "DynamicsEnsemble",
    "DynamicsModule",
    "EnsembleLinear",
    "EnsembleMLP",
    "GaussianHead",
    "IterativeUpdate",
    "MujocoOracle",
    "PriorNet",
    "QEnsemble",
    "mlp",
]


def __getattr__(name: str):
    # Lightning loads only when the training module is asked for: importing an engine
    # or the ensemble stays free of it.
    if name == "DynamicsModule":
        from mbvi.models.dynamics_module import DynamicsModule

        return DynamicsModule
    if name == "MujocoOracle":  # MuJoCo and Gymnasium load only when the oracle is asked for
        from mbvi.models.oracle import MujocoOracle

        return MujocoOracle
    raise AttributeError(f"module 'mbvi.models' has no attribute {name!r}")

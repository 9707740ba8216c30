"""mbvi: model-based variational planning (control as inference).

Choose a prior, an inference engine and a value estimate, and train the result::

    from mbvi import VariationalAgent
    from mbvi.planners import Direct
    agent = VariationalAgent("Pendulum-v1", engine=Direct())
"""

from mbvi.agent import VariationalAgent
from mbvi.distributions import TanhGaussian
from mbvi.errors import (
    CheckpointError,
    ComparisonError,
    ConfigError,
    EnvError,
    MbviError,
    NonFiniteError,
    TrackingError,
)
from mbvi.objectives import Objective, alpha_loss, soft_objective, soft_td_target
from mbvi.priors import ConstantTanhGaussianPrior, LearnedPrior, Prior, UniformPrior
from mbvi.tracking import MLflowTracker
from mbvi.values import TwinQ, ValueEstimate

__all__ = [
    "CheckpointError",
    "ComparisonError",
    "ConfigError",
    "ConstantTanhGaussianPrior",
    "EnvError",
    "LearnedPrior",
    "MLflowTracker",
    "MbviError",
    "NonFiniteError",
    "Objective",
    "Prior",
    "TanhGaussian",
    "TrackingError",
    "TwinQ",
    "UniformPrior",
    "ValueEstimate",
    "VariationalAgent",
    "alpha_loss",
    "soft_objective",
    "soft_td_target",
]

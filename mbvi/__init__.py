"""mbvi: model-based variational planning (control as inference).

Choose a prior, an inference engine and a value estimate, and train the result::

    from mbvi import VariationalAgent
    from mbvi.planners import Direct
    agent = VariationalAgent("Pendulum-v1", engine=Direct())

The package is laid out by role:

- ``mbvi.variational``: the variational maths (distributions, priors, the trajectory
  objective, model rollouts, world-model and value-estimate contracts);
- ``mbvi.training``: the agent loop (the Lightning agent, the M-step, the env runner,
  replay, checkpoints);
- ``mbvi.tracking``: MLflow tracking, run loading and ``mbvi compare``;
- ``mbvi.pyro``: the optimality model of Fig. 1a as a Pyro program (the specification);
- ``mbvi.models`` and ``mbvi.planners``: networks and inference engines.

Names are imported on first use, so ``import mbvi.distributions`` or
``import mbvi.planners.direct`` never loads Lightning, Gymnasium or MLflow.
"""

from __future__ import annotations

from mbvi import _moved
from mbvi._lazy import lazy_exports

_moved.install()

_EXPORTS = {
    "VariationalAgent": "mbvi.training.agent",
    "TanhGaussian": "mbvi.variational.distributions",
    "Posterior": "mbvi.variational.distributions",
    "CheckpointError": "mbvi.errors",
    "ComparisonError": "mbvi.errors",
    "ConfigError": "mbvi.errors",
    "EnvError": "mbvi.errors",
    "MbviError": "mbvi.errors",
    "NonFiniteError": "mbvi.errors",
    "TrackingError": "mbvi.errors",
    "TrajectoryObjective": "mbvi.variational.objectives",
    "alpha_loss": "mbvi.variational.objectives",
    "soft_objective": "mbvi.variational.objectives",
    "soft_td_target": "mbvi.variational.objectives",
    "trajectory_return": "mbvi.variational.objectives",
    "ConstantTanhGaussianPrior": "mbvi.variational.priors",
    "LearnedPrior": "mbvi.variational.priors",
    "Prior": "mbvi.variational.priors",
    "UniformPrior": "mbvi.variational.priors",
    "MLflowTracker": "mbvi.tracking.logger",
    "TwinQ": "mbvi.variational.values",
    "ValueEstimate": "mbvi.variational.values",
    "ModelBasedValue": "mbvi.variational.model_value",
    "WorldModel": "mbvi.variational.world_model",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

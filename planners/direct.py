"""Direct amortised inference: λ = f_φ(s), the posterior of SAC (paper §4.1, Eq. 13-14)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mbvi.errors import ConfigError
from mbvi.models.policy import GaussianHead
from mbvi.planners.base import InferenceEngine, posterior_metrics
from mbvi.variational.distributions import TanhGaussian
from mbvi.variational.objectives import TrajectoryObjective


class Direct(InferenceEngine):
    """SAC's policy: one network maps the state to the posterior's parameters.

    Args:
        hidden: widths of the inference network's hidden layers.
        n_samples: reparameterised action samples per state when estimating E_π[Q̂]
            in the training loss (SAC uses 1).
    """

    def __init__(self, hidden: Sequence[int] = (256, 256), n_samples: int = 1):
        super().__init__()
        if n_samples < 1:
            raise ConfigError(f"Direct: n_samples must be >= 1, got {n_samples}")
        self.hidden, self.n_samples = tuple(hidden), n_samples

    def build(self, obs_dim: int, act_dim: int) -> None:
        super().build(obs_dim, act_dim)
        self.net = GaussianHead(obs_dim, act_dim, self.hidden)

    def infer(self, s: torch.Tensor, objective: TrajectoryObjective | None = None) -> TanhGaussian:
        self.check_states(s, self.obs_dim)
        return TanhGaussian(*self.net(s))

    def loss(
        self, s: torch.Tensor, objective: TrajectoryObjective
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        posterior = self.infer(s)
        j, metrics = objective(posterior, self.n_samples)
        return -j.mean(), {**metrics, **posterior_metrics(posterior)}

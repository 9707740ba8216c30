"""The model side of the agent's M-step: when a model-based value's world model is
refitted, what a refit logs (its losses and its open-loop error by horizon), and the
buffer of model-generated transitions that a ``synthetic_ratio`` of each batch comes
from (MBPO's branched rollouts)."""

from __future__ import annotations

import math

import torch

from mbvi.errors import NonFiniteError
from mbvi.training.model_error import open_loop_errors
from mbvi.training.replay import ReplayBuffer
from mbvi.variational.values import ValueEstimate

MODEL_ERROR_HORIZONS = tuple(range(1, 11))
"""Horizons of the world model's open-loop error (plotted at the end of a run)."""


def refit_due(env_steps: int, warmup_steps: int, model_every: int) -> bool:
    """A refit at the end of warm-up (before the first update) and every
    ``model_every`` env steps after it."""
    n = env_steps
    return n >= warmup_steps and (n == warmup_steps or n % model_every == 0)


class WorldFit:
    """Refits ``value``'s world model and keeps what the refits produce.

    Attributes:
        errors: env step -> the open-loop error at ``MODEL_ERROR_HORIZONS``.
        synthetic: the model-generated transitions (None until the first refit, or
            when the value asks for none).
    """

    def __init__(self, value: ValueEstimate, obs_dim: int, act_dim: int, seed: int):
        self.value, self.obs_dim, self.act_dim, self.seed = value, obs_dim, act_dim, seed
        self.errors: dict[int, list[float]] = {}
        self.synthetic: ReplayBuffer | None = None

    def refit(self, replay: ReplayBuffer, env_step: int) -> dict[str, float]:
        """Refit on ``replay`` -> ``model/train_nll``, ``model/holdout_nll``,
        ``model/holdout_mse``, ``model/rollout_mse_h1|5|10``; a non-finite loss stops
        training with ``NonFiniteError`` (naming the model and the env step)."""
        value, model = self.value, self.value.world_model
        metrics = value.update_model(replay, env_step)
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteError(
                f"the world model ({type(model).__name__}) of {type(value).__name__} "
                f"has a non-finite {bad[0]} at env step {env_step}; training stopped. "
                "Try a lower model_lr."
            )
        errors = open_loop_errors(model, replay, MODEL_ERROR_HORIZONS)
        if errors:
            self.errors[env_step] = list(errors.values())
        metrics.update({f"model/rollout_mse_h{h}": errors[f"model/rollout_mse_h{h}"]
                        for h in (1, 5, 10) if f"model/rollout_mse_h{h}" in errors})  # fmt: skip
        if value.synthetic_ratio > 0:
            self._branch_rollouts(replay)
        return metrics

    def log_error_figure(self, client, run_id: str) -> None:
        """Log the open-loop error by horizon of every refit as the figure
        ``model_error_by_horizon.png`` of MLflow run ``run_id``; nothing when no refit
        measured one (a model-free value)."""
        if not self.errors:
            return
        from mbvi.tracking.figures import model_error_figure, plt

        fig = model_error_figure(self.errors)
        client.log_figure(run_id, fig, "model_error_by_horizon.png")
        plt.close(fig)

    def _branch_rollouts(self, replay: ReplayBuffer) -> None:
        """Add the value's branched model rollouts from replay states to ``synthetic``."""
        value = self.value
        if self.synthetic is None:
            capacity = value.synthetic_rollouts * value.synthetic_horizon * value.synthetic_keep
            self.synthetic = ReplayBuffer(
                capacity, self.obs_dim, self.act_dim, replay.device, seed=self.seed + 1
            )
        starts = replay.sample(value.synthetic_rollouts, self.synthetic.generator)[0]
        self.synthetic.add_batch(*value.synthetic_transitions(starts))

    def batch(self, replay: ReplayBuffer, batch_size: int) -> tuple[torch.Tensor, ...]:
        """An update's batch: replay transitions, a ``synthetic_ratio`` share of them
        replaced by model-generated ones."""
        ratio = self.value.synthetic_ratio
        if ratio > 0 and self.synthetic is None:  # e.g. just resumed: regenerate
            self._branch_rollouts(replay)
        n_syn = int(round(ratio * batch_size))
        if n_syn == 0:
            return replay.sample(batch_size)
        if n_syn == batch_size:
            return self.synthetic.sample(batch_size)
        real, syn = replay.sample(batch_size - n_syn), self.synthetic.sample(n_syn)
        return tuple(torch.cat(x) for x in zip(real, syn))

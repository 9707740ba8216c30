"""How the agent acts, and the measurements it takes on a side stream: evaluation
episodes, videos and the amortisation gap (``VariationalAgent``'s acting half)."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from mbvi.errors import NonFiniteError
from mbvi.planners.gradient import GradientRefinement
from mbvi.training.rng import side_stream
from mbvi.training.runner import evaluate
from mbvi.variational.diagnostics import amortisation_gap


class Acting:
    """Acting and side-stream measurements, mixed into ``VariationalAgent``.

    Reads the agent's ``engine``, ``objective(s)``, ``hparams``, ``device``,
    ``env_steps``, ``buffer``, ``runner``, ``eval_runner``, ``_plan_states`` (a
    planner's warm start per runner), ``_metrics``, ``_video``, ``_refiner`` and
    ``_log``.  Every measurement draws its random numbers from a side stream
    (``mbvi.training.rng.side_stream``), so that none changes the training run.
    """

    def _policy(
        self, obs: np.ndarray, deterministic: bool = False, runner: str = "train"
    ) -> np.ndarray:
        s = torch.as_tensor(obs, dtype=torch.float32, device=self.device).unsqueeze(0)
        with torch.no_grad():
            if hasattr(self.engine, "init_plan_state"):
                if self._plan_states[runner] is None:
                    self._plan_states[runner] = self.engine.init_plan_state(1, s.device, s.dtype)
                plan_state = self._plan_states[runner]
                posterior = self.engine.infer(s, self.objective(s), plan_state=plan_state)
            else:
                posterior = self.engine.infer(s, self.objective(s))
            a = posterior.mean_action() if deterministic else posterior.sample(1)[:, 0]
        action = a[0].cpu().numpy()
        if not np.isfinite(action).all():
            self._metrics.means(self.env_steps)  # names a loss that went non-finite
            raise NonFiniteError(
                f"the action from the engine is NaN or Inf at env step {self.env_steps + 1}; "
                "training stopped."
            )
        return action

    def _eval_policy(self):
        """(the mean-action policy on the eval runner's warm start, a reset of that warm
        start for each new episode)."""
        policy = partial(self._policy, deterministic=True, runner="eval")
        return policy, partial(self._plan_states.__setitem__, "eval", None)

    @torch.no_grad()
    def run_evaluation(self) -> float:
        """Mean return of ``eval_episodes`` mean-action episodes; logged as eval/return.

        Runs on a side stream (``mbvi.training.rng.side_stream``): engines that sample while
        inferring (Iterative's ∇λJ̃) neither shift training's random numbers (so
        ``eval_every`` cannot change a run) nor depend on them."""
        policy, reset_plan = self._eval_policy()
        with side_stream(self.hparams.seed + self.env_steps, self.device):
            returns = evaluate(
                self.eval_runner, policy, self.hparams.eval_episodes, self.env_steps, reset_plan
            )
        mean = float(np.mean(returns))
        self._log({"eval/return": mean, "eval/return_std": float(np.std(returns))})
        self.last_eval_return = mean
        return mean

    @torch.no_grad()
    def record_video(self):
        """One mean-action episode as an MP4 artifact (``mbvi.training.video``), on a
        side stream like evaluation, so that videos never change the training run."""
        policy, reset_plan = self._eval_policy()
        with side_stream(self.hparams.seed + self.env_steps, self.device):
            return self._video.record(policy, self.env_steps, self.logger, reset_plan)

    def measure_amortisation_gap(self) -> dict[str, float]:
        """Log the amortisation gap of the engine on ``gap_states`` replay states, drawn
        (like the refinement's samples) from a side stream: ``gap_every`` never changes
        the training run."""
        if self._refiner is None:
            self._refiner = GradientRefinement(init_loc=0.0, init_log_scale=0.0)
            self._refiner.build(self.runner.obs_dim, self.runner.act_dim)
        with side_stream(self.hparams.seed + self.env_steps, self.device) as generator:
            s = self.buffer.sample(self.hparams.gap_states, generator)[0]
            metrics = amortisation_gap(self.engine, self._refiner, s, self.objective(s))
        self._log(metrics)
        return metrics

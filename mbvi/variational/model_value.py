"""The model-based value estimate (paper §3.2.3; Table 1's model-based column):

    Q̂(s, a) = E[ Σ_{t<H} γ^t m_t (r̂_t − α KL_t) + γ^H m_H (Q̂_leaf(s_H, a_H) − α KL_H) ]

Eq. 6-7 with a learned world model: r̂_t and s_{t+1} from the model, KL_t the future
policy's KL to the prior (t >= 1; a_0 is given), m_t the probability that no
predicted termination came first, and a model-free critic at the leaf, trained by TD
on real transitions.  ``TrajectoryObjective`` over this value is the H-step objective.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch

from mbvi.errors import ConfigError
from mbvi.variational.objectives import TrajectoryObjective, trajectory_return
from mbvi.variational.rollouts import frozen_module, per_particle, rollout
from mbvi.variational.values import TwinQ, ValueEstimate
from mbvi.variational.world_model import Propagation, WorldModel, check_propagation


class ModelBasedValue(ValueEstimate):
    """H-step rollouts of a world model with a critic at the leaf.

    Args:
        model: the world model; default ``mbvi.models.DynamicsEnsemble()`` (7 members,
            5 elites, 4×200 SiLU).  A user's Pyro program is one through
            ``mbvi.pyro.ProgramDynamics``.
        leaf: the critic at the leaf, trained by TD on real transitions; default
            ``TwinQ()``.
        horizon: H model steps (0 is the leaf critic alone).
        future: where actions a_1..a_H come from: ``engine`` (the current posterior,
            inferred against the leaf critic) or ``prior`` (then KL_t = 0 in the KL form).
        propagation: ``ts1`` (one random elite per particle and step, sampled),
            ``mean`` or ``expectation`` (see ``mbvi.variational.world_model``).
        lam: λ of the λ-return over horizons 1..H (1 uses the H-step return only).
        model_lr: Adam learning rate of the world model.
        model_weight_decay: its weight decay.
        model_batch_size: transitions per member per model training step.
        model_epochs: at most this many epochs per refit (early stopping may stop
            sooner), so that a refit's cost stays bounded as the buffer grows.
        model_patience: epochs without hold-out improvement before a refit stops.
        model_holdout: fraction of transitions held out (a fixed split).
        model_max_transitions: a refit trains on at most this many of the newest
            transitions (0: all).
        synthetic_ratio: fraction of every update's batch drawn from model-generated
            transitions (MBPO's branched rollouts; §3.2.3's combination of a learned
            model and an expectation function); 0 trains on real transitions only.
        synthetic_rollouts: branched rollouts started from replay states at each refit.
        synthetic_horizon: steps of each branched rollout (actions from the engine).
        synthetic_keep: refits' worth of synthetic transitions kept.
        model_checkpoint: a ``mbvi fit-model`` checkpoint to start the world model from
            (its env and sizes must match; checked when the agent is built).
    """

    def __init__(
        self,
        model: WorldModel | None = None,
        leaf: ValueEstimate | None = None,
        horizon: int = 5,
        future: Literal["engine", "prior"] = "engine",
        propagation: Propagation = "ts1",
        lam: float = 1.0,
        model_lr: float = 1e-3,
        model_weight_decay: float = 5e-5,
        model_batch_size: int = 256,
        model_epochs: int = 5,
        model_patience: int = 2,
        model_holdout: float = 0.1,
        model_max_transitions: int = 0,
        synthetic_ratio: float = 0.0,
        synthetic_rollouts: int = 10_000,
        synthetic_horizon: int = 1,
        synthetic_keep: int = 5,
        model_checkpoint: str | None = None,
    ):
        super().__init__()
        if horizon < 0:
            raise ConfigError(
                f"ModelBasedValue: horizon must be >= 0 (0 is the leaf critic alone), got {horizon}"
            )
        if future not in ("engine", "prior"):
            raise ConfigError(
                f"ModelBasedValue: future must be 'engine' or 'prior', got {future!r}"
            )
        check_propagation(propagation)
        if not 0.0 < lam <= 1.0:
            raise ConfigError(f"ModelBasedValue: lam must be in (0, 1], got {lam}")
        for name, v in (("model_batch_size", model_batch_size), ("model_epochs", model_epochs),
                        ("model_patience", model_patience)):  # fmt: skip
            if v < 1:
                raise ConfigError(f"ModelBasedValue: {name} must be >= 1, got {v}")
        if not 0.0 < model_holdout < 1.0:
            raise ConfigError(
                f"ModelBasedValue: model_holdout must be in (0, 1), got {model_holdout}"
            )
        if not 0.0 <= synthetic_ratio <= 1.0:
            raise ConfigError(
                f"ModelBasedValue: synthetic_ratio must be in [0, 1] (the fraction of a batch "
                f"from model rollouts), got {synthetic_ratio}"
            )
        for name, v in (("synthetic_rollouts", synthetic_rollouts),
                        ("synthetic_horizon", synthetic_horizon),
                        ("synthetic_keep", synthetic_keep)):  # fmt: skip
            if v < 1:
                raise ConfigError(f"ModelBasedValue: {name} must be >= 1, got {v}")
        if model is None:
            from mbvi.models.dynamics import DynamicsEnsemble

            model = DynamicsEnsemble()
        self.model = model
        self.leaf = leaf if leaf is not None else TwinQ()
        self.horizon, self.future, self.propagation, self.lam = horizon, future, propagation, lam
        self.model_lr, self.model_weight_decay = model_lr, model_weight_decay
        self.model_batch_size, self.model_epochs = model_batch_size, model_epochs
        self.model_patience, self.model_holdout = model_patience, model_holdout
        self.model_max_transitions = model_max_transitions
        self.synthetic_ratio, self.synthetic_rollouts = synthetic_ratio, synthetic_rollouts
        self.synthetic_horizon, self.synthetic_keep = synthetic_horizon, synthetic_keep
        self.model_checkpoint = model_checkpoint
        self._bound = None  # (prior, engine, alpha_fn, gamma), set by bind

    # ---- the contract ---------------------------------------------------------------
    def build(self, obs_dim: int, act_dim: int, env=None) -> None:
        super().build(obs_dim, act_dim)
        self.leaf.build(obs_dim, act_dim)
        if env is None:
            self.model.build(obs_dim, act_dim)
            return
        from mbvi.models.termination import termination_for_env

        termination, kind = termination_for_env(env)
        if kind == "learned":  # no rule known for this env: the model learns a head
            self.model.learned_termination = True
        self.model.build(obs_dim, act_dim, termination)
        if self.model_checkpoint is not None:
            from mbvi.training.model_cli import load_dynamics

            saved = load_dynamics(self.model_checkpoint, env.spec.id, like=self.model)
            self.model.load_state_dict(saved.state_dict())

    def bind(self, prior, policy, alpha, gamma: float) -> None:
        # Kept out of the module tree: the prior and the engine belong to the agent
        # (their parameters must not appear twice in a state_dict or an optimiser).
        object.__setattr__(self, "_bound", (prior, policy, alpha, gamma))

    @property
    def world_model(self) -> WorldModel:
        return self.model

    def td_parameters(self):
        """The parameters ``loss`` trains: the leaf critic's (the model has its own
        optimiser)."""
        return self.leaf.td_parameters()

    def forward(self, s: torch.Tensor, a: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        if self.horizon == 0:
            return self.leaf(s, a, frozen=frozen)
        if self._bound is None:
            raise RuntimeError("ModelBasedValue.bind(prior, engine, alpha, gamma) was not called")
        prior, engine, alpha_fn, gamma = self._bound
        alpha = alpha_fn()
        step = frozen_module(self.model) if frozen else self.model
        policy = None
        if self.future == "engine":
            infer = frozen_module(engine) if frozen else engine

            def policy(rows):
                objective = TrajectoryObjective(rows, self._leaf_frozen, prior, alpha)
                return infer(rows, objective)

        roll = rollout(step, s, a, self.horizon, prior, policy, self.propagation)
        leaf = partial(self.leaf, frozen=frozen)
        if self.lam == 1.0:  # the leaf value at s_H only
            values = per_particle(leaf, roll.states[-1], roll.actions[-1])
        else:  # the λ-return reads it at every step
            values = per_particle(leaf, roll.states, roll.actions)
        return trajectory_return(roll.rewards, roll.kl, roll.alive, values, alpha, gamma, self.lam)

    def _leaf_frozen(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.leaf(s, a, frozen=True)

    def target(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.leaf.target(s, a)

    def loss(self, s, a, y):
        return self.leaf.loss(s, a, y)

    def update_target(self) -> None:
        self.leaf.update_target()

    # ---- the model's own M-step --------------------------------------------------------
    def _fitter(self):
        fitter = self.__dict__.get("_fitter_module")
        if fitter is None:
            from mbvi.models.dynamics_module import DynamicsModule

            fitter = DynamicsModule(
                self.model,
                lr=self.model_lr,
                weight_decay=self.model_weight_decay,
                batch_size=self.model_batch_size,
                holdout_fraction=self.model_holdout,
                max_epochs=self.model_epochs,
                patience=self.model_patience,
                seed=self.model_seed,
            )
            object.__setattr__(self, "_fitter_module", fitter)
            pending = self.__dict__.pop("_pending_optimizer", None)
            if pending is not None:
                fitter.load_optimizer_state(pending)
        return fitter

    def update_model(self, replay, env_step: int) -> dict[str, float]:
        """Refit the world model on the replay buffer (the newest
        ``model_max_transitions``), with early stopping on the fixed hold-out split."""
        if not self.model.trainable:  # the true simulator: nothing to fit
            return {}
        s, a, r, s2, term = replay.transitions()
        if self.model_max_transitions:
            s, a, r, s2, term = (x[-self.model_max_transitions :] for x in (s, a, r, s2, term))
        return self._fitter().fit_transitions(s, a, r, s2, term)

    @torch.no_grad()
    def synthetic_transitions(self, s: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """MBPO's branched rollouts: ``synthetic_horizon`` model steps from replay states
        ``s`` [M,S] under actions sampled from the engine's posterior (inferred against
        the leaf critic) -> (s, a, r, s', terminated), each [K,·], the steps after a
        predicted termination left out."""
        prior, engine, alpha_fn, _ = self._bound
        alpha = alpha_fn()
        out, alive = [], torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
        for _ in range(self.synthetic_horizon):
            objective = TrajectoryObjective(s, self._leaf_frozen, prior, alpha)
            a = engine.infer(s, objective).sample(1)[:, 0]
            step = self.model.step(s, a, self.propagation)
            done = step.terminated > 0.5
            out.append((s[alive], a[alive], step.reward[alive], step.next_state[alive],
                        done[alive].float()))  # fmt: skip
            alive = alive & ~done
            s = step.next_state
        return tuple(torch.cat(x) for x in zip(*out))

    def get_extra_state(self) -> dict:
        """The model optimiser's state travels in the state_dict (and so in checkpoints)."""
        fitter = self.__dict__.get("_fitter_module")
        if fitter is None:
            return {"model_optimizer": self.__dict__.get("_pending_optimizer")}
        return {"model_optimizer": fitter.optimizer_state()}

    def set_extra_state(self, state: dict) -> None:
        opt = state.get("model_optimizer") if isinstance(state, dict) else None
        if opt is None:
            return
        fitter = self.__dict__.get("_fitter_module")
        if fitter is None:
            object.__setattr__(self, "_pending_optimizer", opt)
        else:
            fitter.load_optimizer_state(opt)

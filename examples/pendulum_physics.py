"""Pendulum-v1's physics as the prior mean of a Pyro dynamics program, with a learned
residual: the world model of a model-based value, written as a Pyro user writes it.

    θ̈ = 3g/(2l) sin θ + 3/(ml²) u + residual(s, a)
    s' ~ Normal(physics(s, a, θ̈), σ²)                 at the site "s_next"

``physics`` is Gymnasium's Pendulum-v1 step (dt 0.05, |θ̇| ≤ 8, |u| ≤ 2) on
observations (cos θ, sin θ, θ̇).  The residual MLP is an unmodelled angular
acceleration: it passes through the same integrator, so the mean stays on the circle
and an optimiser's step on it moves the state by dt times as much.  It starts at zero,
so an unfitted model predicts the physics exactly.  mbvi fits the residual and σ by
maximum likelihood on replay transitions, which corrects a wrong mass, length or
gravity.  Actions arrive in [-1, 1], as every world model sees them: u = 2a.

    python examples/pendulum_physics.py          # fit to a heavier pendulum, plan

Plan with it (``mbvi.pyro.ProgramDynamics`` takes both by their import paths; run from
the repository root so that ``examples`` is importable)::

    mbvi fit --config configs/pendulum/smc_physics.yaml
"""

from __future__ import annotations

import math
from functools import partial

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import nn
from torch.distributions import constraints

G, MASS, LENGTH = 10.0, 1.0, 1.0  # Pendulum-v1's defaults
DT, MAX_SPEED, MAX_TORQUE = 0.05, 8.0, 2.0


def physics(
    s: torch.Tensor, a: torch.Tensor, g=G, m=MASS, length=LENGTH, extra_accel=0.0
) -> torch.Tensor:
    """Pendulum-v1's next observation for observations ``s`` [..., 3] and actions ``a``
    [..., 1] in [-1, 1] (semi-implicit Euler, as the env steps), with ``extra_accel``
    [...] added to θ̈."""
    theta, speed = torch.atan2(s[..., 1], s[..., 0]), s[..., 2]
    u = MAX_TORQUE * a[..., 0].clamp(-1.0, 1.0)
    accel = 3 * g / (2 * length) * torch.sin(theta) + 3.0 / (m * length**2) * u + extra_accel
    speed = (speed + accel * DT).clamp(-MAX_SPEED, MAX_SPEED)
    theta = theta + speed * DT
    return torch.stack([torch.cos(theta), torch.sin(theta), speed], -1)


def pendulum_reward(s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Pendulum-v1's reward −(θ² + 0.1 θ̇² + 0.001 u²), θ in (−π, π], from the state
    before the step: ``s`` [..., 3], ``a`` [..., 1] -> [...]."""
    theta, speed = torch.atan2(s[..., 1], s[..., 0]), s[..., 2]
    u = MAX_TORQUE * a[..., 0].clamp(-1.0, 1.0)
    return -(theta.square() + 0.1 * speed.square() + 0.001 * u.square())


class PendulumPhysics(PyroModule):
    """p(s'|s, a): the physics of a pendulum with the given constants, plus a residual
    MLP's angular acceleration (zero at the start), with learned Gaussian noise σ per
    observation dim.

    Args:
        obs_dim: S, must be 3 (given by mbvi when the class is a factory).
        act_dim: A, must be 1.
        hidden: width of the residual's hidden layer.
        noise: initial σ.
        g, m, length: the physics' gravity, mass and length (the prior's belief).
    """

    def __init__(self, obs_dim=3, act_dim=1, hidden=32, noise=0.05, g=G, m=MASS, length=LENGTH):
        super().__init__()
        if (obs_dim, act_dim) != (3, 1):
            raise ValueError(f"a pendulum has obs_dim 3 and act_dim 1, got {obs_dim}, {act_dim}")
        self.g, self.m, self.length = g, m, length
        self.residual = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)
        self.noise = PyroParam(torch.full((3,), noise), constraint=constraints.positive)

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        extra = self.residual(torch.cat([s, a], -1)).squeeze(-1)
        loc = physics(s, a, self.g, self.m, self.length, extra)
        return pyro.sample("s_next", dist.Normal(loc, self.noise).to_event(1))


def pendulum_transitions(mass: float, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """n random-action transitions (s, a, r, s', terminated) of Pendulum-v1 with the
    pole's mass set to ``mass``."""
    import gymnasium as gym
    import numpy as np

    env = gym.make("Pendulum-v1")
    env.unwrapped.m = mass
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    rows = []
    for _ in range(n):
        a = rng.uniform(-1.0, 1.0, 1).astype(np.float32)
        nxt, r, term, trunc, _ = env.step(MAX_TORQUE * a)
        rows.append((obs, a, r, nxt, term))
        obs = env.reset()[0] if term or trunc else nxt
    return tuple(torch.as_tensor(np.array(x), dtype=torch.float32) for x in zip(*rows))


def main(mass: float = 1.5, n: int = 2000, seed: int = 0) -> dict:
    """Fit the physics program (believing mass 1) to a pendulum of mass ``mass`` through
    the agent's refit path, then plan one action with SMC through it."""
    from mbvi.planners import SMC
    from mbvi.pyro import ProgramDynamics
    from mbvi.training.replay import ReplayBuffer
    from mbvi.variational.model_value import ModelBasedValue
    from mbvi.variational.objectives import TrajectoryObjective
    from mbvi.variational.priors import UniformPrior
    from mbvi.variational.values import TwinQ

    torch.manual_seed(seed)
    model = ProgramDynamics(PendulumPhysics, reward=pendulum_reward, factory=True)
    value = ModelBasedValue(model=model, leaf=TwinQ(hidden=(32,)), horizon=3,
                            model_lr=3e-3, model_epochs=100, model_patience=10)  # fmt: skip
    value.build(3, 1)
    replay = ReplayBuffer(n, 3, 1, seed=seed)
    replay.add_batch(*pendulum_transitions(mass, n, seed))
    before = model.holdout_scores(*replay.transitions()[:4])[1]
    fit = value.update_model(replay, n)

    prior, engine = UniformPrior(), SMC(n_particles=64, horizon=5)
    prior.build(3, 1)
    engine.build(3, 1)
    value.bind(prior, engine, lambda: torch.tensor(0.2), 0.99)
    hanging = torch.tensor([[math.cos(3.0), math.sin(3.0), 0.0]])
    objective = TrajectoryObjective(hanging, partial(value, frozen=True), prior, 0.2)
    with torch.no_grad():
        action = engine.infer(hanging, objective).mean_action()
    return {
        "mse_before_fit": float(before),
        "holdout_mse": fit["model/holdout_mse"],
        "holdout_nll": fit["model/holdout_nll"],
        "noise": model.program_module.noise.detach().tolist(),
        "planned_action": action.tolist(),
    }


if __name__ == "__main__":
    for key, val in main().items():
        print(f"{key}: {val}")

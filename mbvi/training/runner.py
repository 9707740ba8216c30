"""The environment side of the agent: stepping, episode bookkeeping and evaluation.

Policies are callables ``obs [S] (np.ndarray) -> action in [-1, 1]^A (np.ndarray)``;
``EnvRunner`` rescales actions to the env's bounds and reports transitions with the
termination flag kept apart from time-limit truncation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mbvi.errors import NonFiniteError
from mbvi.training.env import ActionScaler, make_env

Policy = Callable[[np.ndarray], np.ndarray]


@dataclass
class Transition:
    obs: np.ndarray
    action: np.ndarray  # in [-1, 1]^A
    reward: float
    next_obs: np.ndarray
    terminated: bool
    episode_return: float | None  # set on the last step of an episode


class EnvRunner:
    """One Gymnasium env stepped one transition at a time.

    A plain (non-vector) env keeps the bookkeeping exact: the transition that ends an
    episode is stored with its real final observation, and the reset observation
    starts the next one; nothing from the reset is stored as a transition.
    """

    def __init__(self, env_id: str, seed: int):
        self.env_id, self.seed = env_id, seed
        self.env = make_env(env_id, seed)
        self.scaler = ActionScaler(self.env.action_space)
        self.obs_dim = self.env.observation_space.shape[0]
        self.act_dim = self.env.action_space.shape[0]
        self.episodes = 0
        self._reset(0, seed)

    def _reset(self, env_step: int, seed: int | None = None) -> None:
        self.obs, _ = self.env.reset(seed=seed)
        check_finite(self.env_id, self.obs, 0.0, f"at the reset after env step {env_step}")
        self.episode_return = 0.0

    def step(self, policy: Policy, env_step: int) -> Transition:
        """Act once with ``policy``; ``env_step`` only labels error messages."""
        obs = self.obs
        action = policy(obs)
        next_obs, reward, terminated, truncated, _ = self.env.step(self.scaler.to_env(action))
        reward = float(reward)
        check_finite(self.env_id, next_obs, reward, f"at env step {env_step}")
        self.episode_return += reward
        done_return = None
        if terminated or truncated:
            done_return = self.episode_return
            self.episodes += 1
            self._reset(env_step)
        else:
            self.obs = next_obs
        return Transition(obs, action, reward, next_obs, bool(terminated), done_return)

    def restart(self, seed: int, env_step: int = 0) -> None:
        """Start a fresh episode with a new seed (used after resuming from a checkpoint
        at ``env_step``)."""
        self.env.action_space.seed(seed)
        self._reset(env_step, seed)

    def close(self) -> None:
        self.env.close()


def check_finite(env_id: str, obs: np.ndarray, reward: float, where: str) -> None:
    """NonFiniteError naming the quantity, the env and ``where`` (e.g. "at env step 7")
    unless ``obs`` and ``reward`` are finite."""
    if np.isfinite(reward) and np.isfinite(obs).all():
        return
    quantity = "reward" if not np.isfinite(reward) else "observation"
    raise NonFiniteError(
        f"the {quantity} from env {env_id!r} is NaN or Inf {where}; training stopped. "
        "Check the env and the actions it receives."
    )


def record_episodes(
    env_runner: EnvRunner,
    policy: Policy,
    episodes: int,
    env_step: int = 0,
    on_reset: Callable[[], None] | None = None,
) -> list[tuple[np.ndarray, float]]:
    """``episodes`` full episodes of ``policy`` on ``env_runner``'s env: for each, the
    observations it acted on [T, S] and its return.  ``env_step``, the training step
    the episodes evaluate, only labels error messages; ``on_reset`` is called as each
    episode starts (a planner's warm start is reset there)."""
    env, scaler, env_id = env_runner.env, env_runner.scaler, env_runner.env_id
    where = f"in an evaluation episode at env step {env_step}"
    out = []
    for _ in range(episodes):
        obs, _ = env.reset()
        if on_reset is not None:
            on_reset()
        check_finite(env_id, obs, 0.0, where)
        seen, total, done = [], 0.0, False
        while not done:
            seen.append(obs)
            obs, reward, terminated, truncated, _ = env.step(scaler.to_env(policy(obs)))
            check_finite(env_id, obs, float(reward), where)
            total += float(reward)
            done = terminated or truncated
        out.append((np.stack(seen), total))
    return out


def evaluate(
    env_runner: EnvRunner,
    policy: Policy,
    episodes: int,
    env_step: int = 0,
    on_reset: Callable[[], None] | None = None,
) -> list[float]:
    """Returns of ``episodes`` full episodes of ``policy`` on ``env_runner``'s env."""
    episodes_out = record_episodes(env_runner, policy, episodes, env_step, on_reset)
    return [ret for _, ret in episodes_out]

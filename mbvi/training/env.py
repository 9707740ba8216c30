"""Environments: validated construction and action rescaling.

Engines act in [-1, 1]^A; ``ActionScaler`` maps that cube onto the env's Box bounds.
"""

from __future__ import annotations

import difflib
import importlib

import gymnasium as gym
import numpy as np

from mbvi.errors import EnvError


def make_env(env_id: str, seed: int | None = None) -> gym.Env:
    """``gym.make(env_id)`` with errors a user can act on.

    ``env_id`` is a registered id, or ``"module:EnvId"`` for an env that ``module``
    registers when imported (Gymnasium's convention for third-party envs).

    Raises:
        EnvError: the id is not registered (close registered names are suggested), its
            module cannot be imported, the action space is not a ``Box``, or the
            observation space is not a flat (1-D) ``Box``.
    """
    if ":" in env_id:
        module, _, name = env_id.partition(":")
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise EnvError(
                f"env {env_id!r}: module {module!r} cannot be imported ({err}); make it "
                "importable (install it, or run from the folder that holds it)."
            ) from None
        env_id = name
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise EnvError(
            f"env {env_id!r} is not registered with gymnasium.{hint} "
            "Pass a registered id, e.g. --model.env_id Pendulum-v1."
        )
    env = gym.make(env_id)
    if not isinstance(env.action_space, gym.spaces.Box):
        env.close()
        raise EnvError(
            f"env {env_id!r} has a {type(env.action_space).__name__} action space; mbvi needs "
            "continuous Box actions (tanh-Gaussian posteriors live on [-1, 1]^A)."
        )
    if (
        not isinstance(env.observation_space, gym.spaces.Box)
        or len(env.observation_space.shape) != 1
    ):
        space = env.observation_space
        env.close()
        raise EnvError(
            f"env {env_id!r} has a {type(space).__name__} observation space {space}; mbvi "
            "supports only a flat Box observation of shape (S,) (its networks are MLPs over "
            "a state vector). Wrap the env so that it returns one, e.g. "
            "gymnasium.wrappers.FlattenObservation for a Dict or Tuple space, or an encoder "
            "of your own for images."
        )
    if seed is not None:
        env.action_space.seed(seed)
    return env


class ActionScaler:
    """Affine map between [-1, 1]^A and the env's action bounds."""

    def __init__(self, space: gym.spaces.Box):
        low, high = space.low.astype(np.float64), space.high.astype(np.float64)
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise EnvError(
                f"action space {space} has unbounded dimensions; mbvi needs finite bounds"
            )
        self.center, self.half = (high + low) / 2.0, (high - low) / 2.0
        self.dtype = space.dtype

    def to_env(self, a: np.ndarray) -> np.ndarray:
        return (self.center + self.half * a).astype(self.dtype)

    def from_env(self, a: np.ndarray) -> np.ndarray:
        return ((a - self.center) / self.half).astype(np.float32)

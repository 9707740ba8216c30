"""The true simulator as a world model (DESIGN §3): MuJoCo itself steps the rows.

    oracle = MujocoOracle("HalfCheetah-v5")
    state = physics_state(env)                                   # [nstate] from a live env
    obs, r, d = oracle.rollout_from_state(state[None], a)       # a [M,T,A] in [-1,1]^A
    step = oracle.step(s, a)                                     # from observations [M,S]

Two ways in:

- ``rollout_from_state`` starts from exact physics states (``mj_getState`` with
  ``mjSTATE_FULLPHYSICS``, plus the solver's warm start when given) and reproduces
  ``env.step`` bit for bit: the same ``mj_step`` calls (``mujoco.rollout``, frame_skip
  steps per action with ``ctrl`` held) and the env's own reward and termination,
  vectorised over rows from its own weights (``env.unwrapped``).
- ``step`` (the ``WorldModel`` contract) starts from observations. The supported envs
  are translation invariant in the positions their observation leaves out (x, and y for
  Swimmer), so those are set to 0 and qpos, qvel are read back from the observation.
  This is exact except for (1) the solver's warm start (``qacc_warmstart``, which the
  observation does not carry; the solver may then stop at a point a few ulps away:
  measured 0 on HalfCheetah, Hopper and Swimmer and ~4e-12 on Walker2d over 100 steps),
  the rounding of Δx from x = 0 instead of the true x (measured max abs error of the next
  observation ~2e-13 over 100 HalfCheetah steps, tests/test_oracle.py) and
  (2) state the observation lacks or distorts: Walker2d and Hopper clip joint speeds to
  ±10 in their observation, so a row whose true speed passed 10 starts from the clipped
  speed.

Not differentiable (``differentiable = False``); one member (E = 1); every propagation
is the same deterministic step. Actions arrive in [-1,1]^A and are mapped to the env's
bounds as ``mbvi.training.env.ActionScaler`` does (affine, cast to the space's dtype).

Supported: the Gymnasium v5 MuJoCo envs whose observation, reward and termination are
functions of qpos, qvel and the action alone (see ``SUPPORTED``). Ant, Humanoid,
HumanoidStandup, InvertedDoublePendulum, Reacher and Pusher are not: their reward or
observation reads quantities MuJoCo computes inside ``mj_step`` for the state *before*
its last integration (contact forces, site and body positions), which a state alone
does not give back.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import mujoco
import mujoco.rollout
import numpy as np
import torch

from mbvi.errors import ConfigError
from mbvi.variational.world_model import Propagation, Step, WorldModel, check_propagation

_FULLPHYSICS = mujoco.mjtState.mjSTATE_FULLPHYSICS


@dataclass(frozen=True)
class _EnvKind:
    """How an env's observation, reward and termination read (qpos, qvel, action).

    Attributes:
        excluded: leading qpos entries left out of the observation by default (x, y).
        vel_clip: the bound ``_get_obs`` clips qvel to (a constant in Gymnasium's code),
            or None.
        reward: ``forward`` (w·Δx/dt − ctrl), ``healthy`` (forward + healthy − ctrl,
            terminated when unhealthy) or ``pendulum`` (1 while the pole is up).
    """

    excluded: int
    vel_clip: float | None
    reward: str


SUPPORTED: dict[str, _EnvKind] = {
    "HalfCheetah-v5": _EnvKind(1, None, "forward"),
    "Swimmer-v5": _EnvKind(2, None, "forward"),
    "Walker2d-v5": _EnvKind(1, 10.0, "healthy"),
    "Hopper-v5": _EnvKind(1, 10.0, "healthy"),
    "InvertedPendulum-v5": _EnvKind(0, None, "pendulum"),
}
"""Env ids the oracle runs, with how each reads its state."""

_PENDULUM_MAX_ANGLE = 0.2  # InvertedPendulumEnv.step: |obs[1]| > 0.2 terminates


def physics_state(env: gym.Env) -> tuple[np.ndarray, np.ndarray]:
    """``env``'s exact simulator state: (``mjSTATE_FULLPHYSICS`` vector [nstate],
    ``qacc_warmstart`` [nv]), both copies. Pass them to ``rollout_from_state``."""
    u = env.unwrapped
    state = np.empty(mujoco.mj_stateSize(u.model, _FULLPHYSICS))
    mujoco.mj_getState(u.model, u.data, state, _FULLPHYSICS)
    return state, u.data.qacc_warmstart.copy()


class MujocoOracle(WorldModel):
    """The true MuJoCo simulator of a Gymnasium env as a (non-differentiable) world model.

    Args:
        env_id: a Gymnasium MuJoCo v5 id from ``SUPPORTED``.
        env_kwargs: keyword arguments for ``gym.make`` (e.g. other reward weights); the
            oracle reads every weight from the env it makes.
        threads: MuJoCo threads for ``mujoco.rollout`` (1: the calling thread).
    """

    members = 1
    differentiable = False
    trainable = False

    def __init__(
        self,
        env_id: str = "HalfCheetah-v5",
        env_kwargs: dict | None = None,
        threads: int = 1,
    ):
        super().__init__()
        if env_id not in SUPPORTED:
            raise ConfigError(
                f"MujocoOracle steps MuJoCo envs whose reward is a function of the state; "
                f"got {env_id!r}. Supported: {', '.join(SUPPORTED)}. For any other env use a "
                "learned world model (mbvi.models.DynamicsEnsemble)."
            )
        self.env_id, self.env_kwargs, self.threads = env_id, env_kwargs, threads
        self.kind = SUPPORTED[env_id]
        self._env = gym.make(env_id, **(env_kwargs or {}))
        u = self._env.unwrapped
        self._u, self.model = u, u.model
        self.frame_skip, self.dt = u.frame_skip, u.dt
        self.obs_dim = self._env.observation_space.shape[0]
        self.act_dim = self._env.action_space.shape[0]
        space = self._env.action_space
        low, high = space.low.astype(np.float64), space.high.astype(np.float64)
        self._center, self._half, self._act_dtype = (high + low) / 2, (high - low) / 2, space.dtype
        self._excluded = self.kind.excluded if self._excludes_positions() else 0
        nq, nv = self.model.nq, self.model.nv
        if self.obs_dim != nq - self._excluded + nv:
            raise ConfigError(
                f"{env_id}: observation has {self.obs_dim} dims, expected qpos[{self._excluded}:] "
                f"and qvel ({nq - self._excluded + nv}); the oracle supports the default "
                "observation only"
            )
        self.nstate = mujoco.mj_stateSize(self.model, _FULLPHYSICS)
        self._qpos = slice(1, 1 + nq)  # FULLPHYSICS layout: time, qpos, qvel, act, ...
        self._qvel = slice(1 + nq, 1 + nq + nv)
        self._datas = [mujoco.MjData(self.model) for _ in range(threads)]
        template = np.empty(self.nstate)
        mujoco.mj_getState(self.model, mujoco.MjData(self.model), template, _FULLPHYSICS)
        self._template = template

    def _excludes_positions(self) -> bool:
        return bool(getattr(self._u, "_exclude_current_positions_from_observation", True))

    def build(self, obs_dim: int, act_dim: int, termination=None) -> None:
        """Check the sizes against the env; ``termination`` is ignored (the simulator
        terminates rows by the env's own rule)."""
        if (obs_dim, act_dim) != (self.obs_dim, self.act_dim):
            raise ConfigError(
                f"MujocoOracle({self.env_id!r}) has obs_dim={self.obs_dim}, "
                f"act_dim={self.act_dim}; the agent asked for {obs_dim}, {act_dim}"
            )

    def to_env(self, a: np.ndarray) -> np.ndarray:
        """[-1,1]^A → the env's action bounds, in the action space's dtype."""
        return (self._center + self._half * a).astype(self._act_dtype)

    def rollout_from_state(
        self,
        physics_state: np.ndarray,
        actions: np.ndarray,
        warmstart: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Roll M rows T env steps forward from exact physics states.

        Args:
            physics_state: ``[M, nstate]`` ``mjSTATE_FULLPHYSICS`` vectors.
            actions: ``[M, T, A]`` in [-1,1]^A.
            warmstart: ``[M, nv]`` ``qacc_warmstart`` (see ``physics_state``); None
                starts the solver cold (then equal to ``env.step`` only to ~1e-11).

        Returns:
            obs ``[M,T,S]``, rewards ``[M,T]``, terminated ``[M,T]`` (bool), float64,
            exactly as T calls of ``env.step`` with ``to_env(actions[:, t])`` give them.
        """
        physics_state = np.asarray(physics_state, dtype=np.float64)
        actions = np.asarray(actions)
        m, t, a_dim = actions.shape
        assert physics_state.shape == (m, self.nstate), (
            f"physics_state: expected {(m, self.nstate)}, got {physics_state.shape}"
        )
        assert a_dim == self.act_dim, f"actions: expected [M,T,{self.act_dim}], got {actions.shape}"
        a_env = self.to_env(actions)
        control = np.repeat(a_env.astype(np.float64), self.frame_skip, axis=1)
        states, _ = mujoco.rollout.rollout(
            self.model,
            self._datas if self.threads > 1 else self._datas[0],
            physics_state,
            control,
            initial_warmstart=warmstart,
        )
        states = states[:, self.frame_skip - 1 :: self.frame_skip]  # [M,T,nstate]
        qpos, qvel = states[..., self._qpos], states[..., self._qvel]
        x = np.concatenate([physics_state[:, None, self._qpos][..., 0], qpos[..., 0]], axis=1)
        return self._outcome(qpos, qvel, x, a_env)

    def _outcome(self, qpos, qvel, x, a_env):
        """Observation, reward and termination of ``env.step`` from the states after each
        step (qpos [M,T,nq], qvel [M,T,nv]), x positions before and after ([M,T+1]) and
        the env actions [M,T,A]; the same float operations, in the same order."""
        u, kind = self._u, self.kind
        vel = qvel if kind.vel_clip is None else np.clip(qvel, -kind.vel_clip, kind.vel_clip)
        obs = np.concatenate([qpos[..., self._excluded :], vel], axis=-1)
        if kind.reward == "pendulum":
            terminated = ~np.isfinite(obs).all(-1) | (np.abs(obs[..., 1]) > _PENDULUM_MAX_ANGLE)
            return obs, (~terminated).astype(np.float64), terminated
        forward = u._forward_reward_weight * ((x[:, 1:] - x[:, :-1]) / self.dt)
        ctrl = u._ctrl_cost_weight * np.sum(np.square(a_env), axis=-1)
        if kind.reward == "forward":
            return obs, forward - ctrl, np.zeros(forward.shape, dtype=bool)
        healthy = self._is_healthy(qpos, qvel)
        reward = (forward + healthy * u._healthy_reward) - ctrl
        return obs, reward, ~healthy & bool(u._terminate_when_unhealthy)

    def _is_healthy(self, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        """Walker2d's and Hopper's ``is_healthy`` on [M,T,·] states."""
        u = self._u
        z, angle = qpos[..., 1], qpos[..., 2]
        (min_z, max_z), (min_a, max_a) = u._healthy_z_range, u._healthy_angle_range
        healthy = (min_z < z) & (z < max_z) & (min_a < angle) & (angle < max_a)
        if hasattr(u, "_healthy_state_range"):  # Hopper: every entry of state_vector()[2:]
            lo, hi = u._healthy_state_range
            rest = np.concatenate([qpos, qvel], axis=-1)[..., 2:]
            healthy &= np.all((lo < rest) & (rest < hi), axis=-1)
        return healthy

    def states_from_obs(self, obs: np.ndarray) -> np.ndarray:
        """``[M,S]`` observations → ``[M,nstate]`` physics states: left-out positions 0,
        qpos and qvel from the observation, everything else as in a fresh ``MjData``."""
        nq = self.model.nq
        n_pos = nq - self._excluded
        states = np.tile(self._template, (obs.shape[0], 1))
        states[:, self._qpos] = 0.0
        states[:, self._qpos.start + self._excluded : self._qpos.stop] = obs[:, :n_pos]
        states[:, self._qvel] = obs[:, n_pos:]
        return states

    @torch.no_grad()
    def step(
        self,
        s: torch.Tensor,
        a: torch.Tensor,
        propagation: Propagation = "ts1",
        generator: torch.Generator | None = None,
    ) -> Step:
        """One env step of observations ``s`` [M,S] under actions ``a`` [M,A] in
        [-1,1]^A (module docstring: exact up to the solver warm start and clipped
        speeds). Deterministic, so ``propagation`` and ``generator`` change nothing.
        Returns tensors on ``s``'s device and dtype, without gradient."""
        check_propagation(propagation)
        assert s.shape[-1] == self.obs_dim and a.shape == (*s.shape[:-1], self.act_dim), (
            f"expected s [M,{self.obs_dim}], a [M,{self.act_dim}]; got {tuple(s.shape)}, "
            f"{tuple(a.shape)}"
        )
        obs = s.detach().to("cpu", torch.float64).numpy()
        act = a.detach().to("cpu", torch.float64).numpy()
        obs2, reward, terminated = self.rollout_from_state(self.states_from_obs(obs), act[:, None])
        out = dict(device=s.device, dtype=s.dtype)
        return Step(
            next_state=torch.as_tensor(obs2[:, 0], **out),
            reward=torch.as_tensor(reward[:, 0], **out),
            terminated=torch.as_tensor(terminated[:, 0], **out),
        )
